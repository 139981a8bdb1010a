"""The command-line tools' libraries, on top of the engine: quantize (GGUF writer), compress (low-rank), awq
(AWQ calibration), quality (perplexity / model comparison), bench (llama-bench style timing)."""
