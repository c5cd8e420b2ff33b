"""The models: configs and weights, the static-cache Llama, tokenizers, inputs, the cost model, quantization (quant/)."""
