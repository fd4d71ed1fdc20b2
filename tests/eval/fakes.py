"""A character tokenizer with a Jinja chat template, and a tiny random Llama, for fast eval tests."""
import contextlib
import functools
import io

import jinja2
import torch

GENERIC = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QWEN3 = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
         "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
         "{% endif %}{% endif %}")
PANGU = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '[unused9]系统：' + message['content'] "
         "+ '[unused10]' }}{% endif %}{% if message['role'] == 'user' %}{{'[unused9]用户：' + message['content'] + "
         "'[unused10]'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}")


class CharTokenizer:
    """Token id = ord(c) % 60 + 1 (1..60); id 0 is EOS; decoding maps ids back to printable chars."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    def __init__(self, chat_template=GENERIC):
        self.chat_template = chat_template

    def _ids(self, text):
        return [ord(c) % 60 + 1 for c in text]

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = self._ids(text)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + (i % 60)) for i in ids if not (skip_special_tokens and i == 0))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kwargs):
        assert not tokenize
        return jinja2.Template(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt, **kwargs)


@functools.lru_cache(maxsize=None)
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=0, bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def run_cli(argv):
    """``(exit status, stdout, stderr)`` of ``qnpu`` with ``argv``, in this process."""
    from qnpu.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
