"""Shared helpers of the server tests: a tiny random Llama with a character-level HF tokenizer (with a
chat template), random K/V tasks saved as ``<task>.safetensors``, and an in-process server."""
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from test_integration_common import VOCAB, make_model, random_prefixes

SPECIALS = ["<pad>", "<s>", "<unk>", "</s>"]          # EOS = 3, as in the engine tests
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-+*/=()[]{}<>#@$%&_~^'\"|\n"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<a>{% endif %}")
LENGTHS = [5, 2, 0, 3]
TASKS = [f"task{i}" for i in range(len(LENGTHS))]


def char_tokenizer():
    """A real ``PreTrainedTokenizerFast``: one token per character, ids 4.. (vocabulary of 96)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS[:VOCAB - len(SPECIALS)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(seed=0):
    """Room for long generations (a request that is still running when a test acts on it)."""
    model = make_model("llama", seed=seed, max_position_embeddings=4096)
    model.generation_config.eos_token_id = 3
    return model


def write_tasks(model, directory, lengths=LENGTHS, names=TASKS):
    """Random cache-convention prefixes as ``<task>.safetensors``; ``{name: (k, v)}``."""
    prefixes = dict(zip(names, random_prefixes(model, lengths, scale=2.0).values()))
    directory.mkdir(parents=True, exist_ok=True)
    for name, (k, v) in prefixes.items():
        save_file({"k": k.contiguous(), "v": v.contiguous()}, str(directory / f"{name}.safetensors"))
    return prefixes


API_KEY = "sk-test-key"


class Served:
    """A tiny-model server in this process: ``url``, ``worker``, ``tasks`` ({name: (k, v)}), and
    ``offline(...)``: ``Engine.generate`` on the server's own engine (call it only while the server is idle)."""

    def __init__(self, tmp_path, **config):
        from softprompt.server import ServerConfig, ServerThread, build
        model = tiny_model()
        self.tasks = write_tasks(model, tmp_path / "tasks")
        config.setdefault("model_id", "tiny")
        config.setdefault("api_key", API_KEY)
        engine_kw = {k: config.pop(k) for k in ("max_batch_size",) if k in config}
        self.config = ServerConfig(**config)
        app, self.worker = build(model, char_tokenizer(), self.config, tmp_path / "tasks", page_size=4, **engine_kw)
        self.thread = ServerThread(app, self.worker).start()
        self.url = self.thread.url

    def offline(self, prompts, tasks, sampling):
        engine = self.worker.engine
        return self.worker.call(lambda: engine.generate(prompts, tasks, sampling)).result(timeout=120)

    def state(self):
        return self.worker.call(self.worker.snapshot).result(timeout=30)

    def stop(self):
        self.thread.stop()
