"""The llama.cpp boundary: nothing outside this package calls llama-cpp-python (the quantizer's own
llama_model_quantize and ggml quantizer calls aside)."""
