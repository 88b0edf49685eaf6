"""What `pip install sharelora` alone (no extras) must do; run by .ci/core_install.sh in a fresh venv.

The method works: import, adapt a tiny model, save, load, export to PEFT's format and import it back,
all without peft (or bitsandbytes) being imported. The commands of extras that are not installed stop
with one line naming the extra.
"""

import subprocess
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sharelora
from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model
from sharelora.extras import MissingExtraError, missing_modules


passed = 0


def check(condition, what):
    global passed
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(f"core: {passed} passed, 1 failed")
    passed += 1
    print(f"ok: {what}")


check(missing_modules("train") and missing_modules("serve") and missing_modules("peft"),
      f"the extras are not installed (train misses {missing_modules('train')}, serve {missing_modules('serve')})")
check(sharelora.__version__ == metadata.version("sharelora") != "0+unknown",
      f"one version, from the package metadata ({sharelora.__version__})")
check(resources.files("sharelora").joinpath("py.typed").is_file(), "py.typed is shipped")

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).eval()
ids = torch.randint(0, 64, (2, 7))
with torch.no_grad():
    expected_base = base(input_ids=ids).logits
model = get_sharelora_model(base, ShareLoraConfig(rank=4, alpha=8, share="A", target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
with torch.no_grad():
    adapted = model(input_ids=ids).logits
    with model.disable_adapter():
        check(torch.equal(model(input_ids=ids).logits, expected_base), "disable_adapter gives the base outputs")
check(not torch.allclose(adapted, expected_base), "the adapter changes the outputs")

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model.save_pretrained(tmp / "adapter")
    torch.manual_seed(0)
    plain = LlamaForCausalLM(base.config).eval()  # the same random base, rebuilt
    loaded = ShareLoraModel.from_pretrained(plain, tmp / "adapter").eval()
    with torch.no_grad():
        check(torch.allclose(loaded(input_ids=ids).logits, adapted, atol=1e-6), "save_pretrained / from_pretrained")
    model.export_peft(tmp / "peft")
    check((tmp / "peft" / "adapter_config.json").is_file() and (tmp / "peft" / "adapter_model.safetensors").is_file(),
          "export_peft writes a PEFT LoRA directory")
    torch.manual_seed(0)
    imported = ShareLoraModel.from_peft(LlamaForCausalLM(base.config).eval(), tmp / "peft").eval()
    with torch.no_grad():
        check(torch.allclose(imported(input_ids=ids).logits, adapted, atol=1e-5), "from_peft gives the same logits")
check("peft" not in sys.modules and "bitsandbytes" not in sys.modules, "neither peft nor bitsandbytes was imported")

try:
    import sharelora.serve  # noqa: F401
    check(False, "import sharelora.serve without the serve extra fails")
except MissingExtraError as e:
    check("pip install 'sharelora[serve]'" in str(e) and "\n" not in str(e), f"import sharelora.serve: {e}")

for argv, extra in ((["serve", "--help"], "serve"), (["train"], "train"), (["train", "--max-steps", "1"], "train"),
                    (["export-peft", "runs/x", "out"], "train")):
    done = subprocess.run([sys.executable, "-m", "sharelora", *argv], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    check(done.returncode == 2 and len(lines) == 1 and f"pip install 'sharelora[{extra}]'" in lines[0]
          and "Traceback" not in done.stderr, f"sharelora {' '.join(argv)}: {done.stderr.strip()!r}")
done = subprocess.run([sys.executable, "-m", "sharelora", "--version"], capture_output=True, text=True, timeout=300)
check(done.returncode == 0 and done.stdout.strip() == f"sharelora {sharelora.__version__}", "sharelora --version")
done = subprocess.run([sys.executable, "-m", "sharelora", "--help"], capture_output=True, text=True, timeout=300)
check(done.returncode == 0 and "pip install 'sharelora[train]'" in done.stdout, "sharelora --help names the extras")
print(f"core: {passed} passed, 0 failed")
