"""Teachers: generation engines (vllm, openai, hf, scripted), the generate stage and the caption stage."""
