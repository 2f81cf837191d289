"""The pure core: request → (prompt, sampling spec); engine output → responses. No I/O, no vllm."""
