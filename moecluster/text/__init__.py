"""Text <-> tokens for both the request front end and the workers: the checkpoint's tokenizer,
its chat template and incremental detokenization. No torch, no ray, nothing else of ours."""
