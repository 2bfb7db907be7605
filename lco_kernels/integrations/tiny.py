"""A tiny random causal LM, a word-level tokenizer, a prompt set and a toy reward, all built locally
(no download): what the demo and the framework tests train, on CPU, in seconds."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def tiny_tokenizer(vocab_size=512):
    """Word-level tokenizer over "w0" .. "w{vocab_size-4}" plus pad/eos/unk (ids 0, 1, 2)."""
    words = [PAD, EOS, UNK] + [f"w{k}" for k in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: k for k, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # WordPiece's decoder joins whole words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def tiny_model(vocab_size=512, hidden_size=64, num_layers=2, seed=0):
    """A randomly initialised Qwen2 causal LM (untied head, so the LM-head weight is its own parameter)."""
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def prompt_dataset(n=32, words_per_prompt=4, vocab_size=512):
    """In-memory dataset of plain-text prompts (TRL's "prompt" column)."""
    from datasets import Dataset
    prompts = [" ".join(f"w{(7 * k + j) % (vocab_size - 3)}" for j in range(words_per_prompt)) for k in range(n)]
    return Dataset.from_dict({"prompt": prompts})


def toy_reward(completions, **kwargs):
    """The fraction of completion words with an even number ("w2", "w14", ...): about half the words of a
    random model, so rewards differ within every group of samples and advantages are non-zero."""
    def even(word):
        return word[1:].isdigit() and int(word[1:]) % 2 == 0
    return [sum(map(even, c.split())) / max(len(c.split()), 1) for c in completions]
