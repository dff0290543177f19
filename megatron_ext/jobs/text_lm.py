"""The ``text_lm`` run kind: a GPT trained on a text corpus (the floor every multimodal run is compared to)."""

from __future__ import annotations

from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.loop import base_hf_config, build_trainer, initialize_from, run_training
from megatron_ext.training.parallel import init_distributed
from viq_mllm.data.text import TokenWindows, micro_batches, read_text_files, stdlib_docs_corpus
from viq_mllm.recipe import Recipe
from viq_mllm.vocab import padded_vocab_size
from viq_mllm.vocab.text_tokenizers import load_text_tokenizer


def train_text_lm(recipe: Recipe) -> list[dict]:
    p, t, m = recipe.parallel, recipe.train, recipe.model
    layout = init_distributed(p.tp, p.pp, t.seed, p.vpp, p.timeout_s)
    tokenizer = load_text_tokenizer(recipe.data.tokenizer)
    documents = read_text_files(recipe.data.text_files) if recipe.data.text_files else stdlib_docs_corpus()
    dataset = TokenWindows(documents, tokenizer, m.seq_length)
    config = transformer_config(m, p, t.precision, t.fp8_recipe)
    model = [build_gpt(config, m, p, padded_vocab_size(tokenizer.vocab_size), layout, t.seed, chunk=chunk)
             for chunk in layout.chunks]
    vocab = VocabRecord(text_size=tokenizer.vocab_size, padded_size=padded_vocab_size(tokenizer.vocab_size),
                        text_fingerprint=tokenizer.fingerprint)
    initialize_from(recipe, vocab, lambda meta: model)  # e.g. a converted HF checkpoint
    trainer = build_trainer(recipe, layout, model, vocab, hf_config=base_hf_config(recipe))

    def batches(step: int):
        return micro_batches(
            dataset, t.seed, step, t.global_batch_size, t.micro_batch_size, layout.dp_rank, layout.dp_size
        )

    return run_training(trainer, batches, tokens_per_step=t.global_batch_size * m.seq_length)
