# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore an evaluated run
#
# Looks at what `agcg evaluate` wrote for one run: the headline numbers, each
# beside its chance level or baseline, the translations of both directions
# (paper Fig. 4: real image, attention map, masked generator output,
# translation and difference, and on phantoms the exact counterfactual twin)
# and the classifier's decision maps (paper Fig. 5). Nothing is trained here;
# everything is read from the run's workdir through `agcg_jax.report` and
# drawn by `agcg_jax.figures`.
#
# Set `AGCG_WORKDIR` (or edit the cell below) to point at another run.

# %% tags=["parameters"]
import os

WORKDIR = os.environ.get("AGCG_WORKDIR", "runs/demo")
CASES = 3  # examples shown per translation direction and per CAM block

# %%
# %matplotlib inline
from pathlib import Path

from IPython.display import display

from agcg_jax import figures, report
from agcg_jax import workdir as workdir_lib

# A relative WORKDIR is taken from the repository root, where `agcg` runs;
# the notebook itself runs in notebooks/.
workdir = Path(WORKDIR)
if not workdir.is_absolute() and not workdir.exists() and (Path("..") / workdir).exists():
  workdir = Path("..") / workdir
metrics = workdir_lib.load_metrics(workdir)
examples = workdir_lib.load_examples(workdir)  # an agcg_jax.examples.ExampleMaps
print(f"run: {workdir.resolve()}")
print(f"{len(examples)} example cases; decision map: {examples.cam_kind}")
print(f"dataset: {metrics.get('dataset')}, image size: {metrics.get('image_size')}, "
      f"date: {metrics.get('date')}")

# %% [markdown]
# ## Headline numbers

# %%
print(report.headline(metrics))
print()
rows = report.metric_rows(metrics)
width = max(len(row.label) for row in rows)
for row in rows:
  print(f"{row.label:<{width}}  {row.value:>8}  {row.baseline}")

# %% [markdown]
# Confusion matrices: rows are the actual class (for translated images, the
# class of the source image), columns the prediction. In the paper's Table 2
# the "Positive" row is No Finding.

# %%
names = metrics.get("class_names", list(report.CLASS_NAMES))
for key, title in (("confusion_original", "original"), ("confusion_translated", "translated")):
  matrix = metrics.get(key)
  if matrix is None:
    continue
  print(f"{title} test data".ljust(26) + "".join(f"{'pred ' + n:>20}" for n in names))
  for name, row in zip(names, matrix):
    print(f"  actual {name}".ljust(26) + "".join(f"{int(v):>20d}" for v in row))
  print()

# %% [markdown]
# ## Translations (paper Fig. 4)
#
# Attention is 0 where the translation keeps the pixel and 1 where it takes the
# generator's output; Diff is translated minus real (red: brighter after
# translation). On phantoms the red contour is the original heart outline, the
# Twin column is the exact counterfactual (the same phantom with the other
# label) and |Twin − Real| the true change, on Diff's scale; row labels give
# the prediction before and after and the measured cardiothoracic ratio.

# %%
for direction in figures.DIRECTION_NAMES:
  display(figures.figure_translation(examples, direction, cases=CASES))

# %% [markdown]
# ## Decision maps (paper Fig. 5)
#
# (a) and (d) are correct predictions, (b) and (c) mistakes. The map is
# signed (red: for the predicted class, blue: against it) and drawn raw on
# one symmetric scale for the whole figure; which map it is:

# %%
print(report.cam_note(metrics.get("cam_kind") or examples.cam_kind))
display(figures.figure_cam(examples, per_cell=CASES))

# %% [markdown]
# ## Training curves

# %%
curves = figures.figure_training_curves(workdir_lib.load_training_logs(workdir))
if curves is None:
  print("no training logs in this workdir")
else:
  display(curves)
