"""The pipeline's stages, one module each: seed, expert, mix, finetune, evaluate, compare (the recipes)."""
