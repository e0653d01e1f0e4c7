"""Models: the families btx can mix (tensor roles as data), dense seeds, tokenizers, safetensors I/O, model cards."""
