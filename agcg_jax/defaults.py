"""The config schema shared by every config file (configs/*.py): full-size defaults.

Each config file's get_config() starts from `base()` and changes fields.
Batch sizes are per device: the global batch is batch_per_device x the number
of devices (the paper's batch 1 = one image per device). With D devices the
effective batch grows D-fold; the learning rates are the paper's for its
batch and are left as they are (Adam is insensitive to gradient scale; if a
large data-parallel run diverges, lower them or set global_batch).
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.kind = "phantoms"          # "phantoms" or "nih"
  d.dir = ""                   # prepared TFDS data; "" = <workdir>/data
  d.image_size = 256
  d.num_train = 4000           # phantoms only
  d.num_test = 1000            # phantoms only
  d.workers = 0                # Grain worker processes (0: in-process)

  c.model = m = ml_collections.ConfigDict()
  m.dtype = "float32"          # compute dtype: float32 or bfloat16 (params stay float32)
  m.padding = "reflect"
  m.gen_width = 64             # c7s1-64, d128, d256
  m.gen_down = 2
  m.gen_res = 9
  m.gen_upsample = "subpixel"  # subpixel | transpose | resize
  m.att_width = 32
  m.att_dilations = (1, 2, 4, 1)
  m.dis_width = 64             # 70x70 PatchGAN
  m.dis_layers = 3
  m.dis_sigmoid = False        # hinge loss wants raw logits (DESIGN.md)
  m.cls_width = 64             # classifier trunk = discriminator trunk
  m.cls_layers = 3

  c.classifier = k = ml_collections.ConfigDict()
  k.batch_per_device = 8
  k.global_batch = 0           # > 0: explicit global batch (must divide by the devices)
  k.steps = 5000
  k.lr = 3.2e-3
  k.b1 = 0.5
  k.b2 = 0.9
  k.decay_start = 1.0          # fraction of steps before linear decay to 0; 1 = constant
  k.class_weights = False      # weight the loss by inverse class frequency (unbalanced training sets)
  k.log_every = 50
  k.ckpt_every = 500
  k.keep = 3

  c.gan = g = ml_collections.ConfigDict()
  g.batch_per_device = 1
  g.global_batch = 0
  g.steps = 100000
  g.lr_g = 1e-4
  g.lr_a = 1e-4
  g.lr_d = 4e-4
  g.b1 = 0.5
  g.b2 = 0.9
  g.decay_start = 0.5          # constant, then linear decay to 0 (original AG-CycleGAN code)
  g.adv_loss = "hinge"         # hinge | lsgan | bce
  g.cycle_loss = "mse"         # mse | l1
  g.lambda_cycle = 10.0
  g.lambda_identity = 0.0
  g.lambda_attention_l1 = 0.0   # not in the paper: sparsity of the attention map (GANimation)
  g.lambda_attention_tv = 0.0   # not in the paper: smoothness of the attention map
  g.two_stage_start = 1.0       # original AG-CycleGAN: from this fraction of the run on, freeze
                                # attention and show D only the attended region; 1 = never (paper)
  g.attention_threshold = 0.1   # tau of that second stage
  g.log_every = 100
  g.ckpt_every = 2000
  g.keep = 3

  c.ctr = r = ml_collections.ConfigDict()   # CTR regressor (phantoms): measures translated hearts
  r.batch_per_device = 16
  r.steps = 2000
  r.lr = 1e-3
  r.width = 32
  r.layers = 3
  r.log_every = 100

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 32
  e.max_examples = 0           # 0 = the whole test set
  e.cam = "margin"             # the scored/shown decision map: "margin" (headline) or "equ9" (cam.py)
  e.truth_threshold_grey = 8.0 # phantom truth: body pixels where the twin differs by more (of 255)
  e.num_figure_examples = 4
  return c
