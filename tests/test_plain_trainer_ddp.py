"""The README's plain-Trainer DDP script (`plain_ddp.py`), run as written under `torchrun` with 2 CPU processes: with
`TrainingArguments(use_cpu=True)` the processes train on disjoint shards of every batch and end with identical
weights; without it (transformers' rule on a machine without CUDA) each trains alone on the whole data."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from test_ddp import _free_port

ROOT = Path(__file__).resolve().parent.parent
# Records the rows each training step of this process sees (their second token), then saves them with the weights.
RECORD = """
import transformers
seen = []
_step = transformers.Trainer.training_step
def _recording_step(self, model, inputs, *args, **kwargs):
    seen.extend(inputs["input_ids"][:, 1].tolist())
    return _step(self, model, inputs, *args, **kwargs)
transformers.Trainer.training_step = _recording_step
"""
SAVE = """
import os
torch.save({"seen": seen, "world_size": args.world_size, "state": trainer.model.state_dict(),
            "in_group_at_exit": torch.distributed.is_initialized()}, f"rank{os.environ['RANK']}.pt")
"""


def readme_script() -> str:
    blocks = re.findall(r"^```python\n(# plain_ddp.py\n.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    assert len(blocks) == 1, "README.md has no (or several) plain_ddp.py blocks"
    return blocks[0]


def run_two_processes(tmp_path, code):
    script = tmp_path / "plain_ddp.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + RECORD + code + SAVE)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(_free_port()), str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]


def test_the_readme_plain_trainer_trains_disjoint_shards_with_identical_weights(tmp_path):
    ranks = run_two_processes(tmp_path, readme_script())
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert [rank["in_group_at_exit"] for rank in ranks] == [False, False]  # the script left the group (Trainer.end)
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 16  # 4 steps of 4 rows
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # each process its own rows
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name


def test_without_use_cpu_each_process_trains_alone(tmp_path):
    """What the README warns about: transformers' rule, checked so that the warning stays true."""
    code = readme_script()
    assert "use_cpu=True, " in code
    ranks = run_two_processes(tmp_path, code.replace("use_cpu=True, ", ""))
    assert [rank["world_size"] for rank in ranks] == [1, 1]
    assert set(ranks[0]["seen"]) == set(ranks[1]["seen"])  # the same rows in both: no sharding
