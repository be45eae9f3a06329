"""``generate_command``: a saved tiny model + a folder of <task>.safetensors adapters."""
import pytest
import torch

from test_engine_common import one_thread

_threads = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers as tf
    from softprompt import assets
    try:
        tok_dir = assets.smollm2_dir()              # only its tokenizer is used
    except Exception as exc:                         # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer not available: {exc}")
    tok = tf.AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    from safetensors.torch import save_file
    (out / "adapters").mkdir()
    g = torch.Generator().manual_seed(1)
    for name, P in (("alpha", 6), ("beta", 3)):
        save_file({"k": torch.randn(2, 2, P, 8, generator=g), "v": torch.randn(2, 2, P, 8, generator=g)},
                  str(out / "adapters" / f"{name}.safetensors"))
    return out


def test_generate_command_serves_tasks_and_reports(model_dir, capsys):
    from softprompt.engine.cli import generate_command
    rc = generate_command(["--model", str(model_dir / "model"), "--adapters", str(model_dir / "adapters"),
                           "--task", "alpha", "--task", "beta", "--task", "none", "--max-new-tokens", "5",
                           "--ignore-eos", "Hello there", "Bonjour", "One two three"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[0] task=alpha (5 tokens" in out and "[1] task=beta" in out and "[2] task=none" in out
    assert "tokens/s" in out and "batch occupancy" in out and "KV cache peak" in out


def test_generate_command_reports_bad_task(model_dir, capsys):
    from softprompt.engine.cli import generate_command
    with pytest.raises(ValueError, match=r"--task 'gamma' is not a task of .*\['alpha', 'beta', 'none'\]"):
        generate_command(["--model", str(model_dir / "model"), "--adapters", str(model_dir / "adapters"),
                          "--task", "gamma", "--max-new-tokens", "2", "--stream", "Hi"])
