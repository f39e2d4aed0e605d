"""`agcg bench`: the training step timed through the training code, a profile, the input alone."""
import glob
import json
import os

import pytest

from agcg_jax import bench
from agcg_jax import cli
from agcg_jax.models import cpu_kernels


@pytest.mark.slow
def test_bench_times_the_training_step_and_writes_a_profile(tiny_config, tmp_path):
  row = bench.bench_gan_step(tiny_config, size=32, batch_per_device=2, dtype="fp32", steps_n=2,
                             warmup=1, profile_dir=str(tmp_path / "prof"))
  assert row["images_per_s"] > 0 and row["loss_finite"] and row["global_batch"] == 2 * row["devices"]
  assert row["conv_rewrites"] is True  # 'auto' on the CPU
  assert row["cpu_kernels"] is cpu_kernels.load()
  assert glob.glob(str(tmp_path / "prof" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_bench_input_measures_the_pipeline_alone(data_dir, tmp_path, capsys):
  from agcg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out = tmp_path / "rows.jsonl"
  assert cli.run(["bench", "--input", pipeline.find_dataset_dir(data_dir), "--batch", "4",
                  "--workers", "0", "--out", str(out)]) == 0
  rows = [json.loads(line) for line in open(out)]
  assert len(rows) == 1 and rows[0]["images_per_s"] > 0 and rows[0]["worker_count"] == 0
  assert rows[0]["batch_size"] == 4 and os.path.getsize(out) > 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rows[0]
