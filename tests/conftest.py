"""Shared tiny stand-ins: a word-level tokenizer and a random tiny Llama saved like a Hub model."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

WORDS = ("the heart is normal enlarged size lungs are clear no pleural effusion left right small "
         "opacity upper lower lobe tube in place write findings of this chest x-ray : describe that "
         "report belongs to view views frontal lateral , .").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=512)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory, tokenizer):
    """A random 2-layer Llama saved with save_pretrained, loaded by path exactly as Llama-2 is."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("llm")
    llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def largest_difference(a, b) -> tuple[float, str]:
    """The largest absolute difference between two state dicts with the same keys, and where it is."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


def env_without_java(threads: int = 2) -> dict:
    """The environment for a train.py subprocess: `threads` threads, and a PATH without java, so the
    final evaluation skips the METEOR jar (~20 s a run), as evaluate.py does on a machine without it."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PATH": os.path.dirname(sys.executable)}
