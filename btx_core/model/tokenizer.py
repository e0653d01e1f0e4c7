"""A byte-level BPE tokenizer for a created seed, trained on its pretraining corpus.

Byte-level (GPT-2 style) so that any text, code included, encodes without an unknown token and
decodes back to exactly the same string. `<|endoftext|>` separates documents (bos, eos and unk
all point at it, as in GPT-2); `<|pad|>` pads batches. Saved in Hugging Face layout, so
`AutoTokenizer.from_pretrained(out_dir)` loads it offline and the MoE checkpoint ships it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]


def train_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `docs`, save it to `out_dir`, and return it loaded.
    The same documents in the same order give the same tokenizer.json."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{minimum} (256 bytes + special tokens)")
    if not any(docs):
        raise ValueError("cannot train a tokenizer on no text: give it some documents")

    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decode(encode(x)) must give x back exactly, leading spaces included.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes from the start, so nothing ever falls back to unk.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        # Spaces before punctuation are part of code; "cleaning" them would break round trips.
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped
