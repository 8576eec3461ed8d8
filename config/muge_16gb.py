# MUGE ECommerce-T2I on one 16 GB GPU (RTX 4070 Ti SUPER class), after `prepare.py --out_dir data/muge`:
#   python train.py config/muge_16gb.py
# The codebook, code grid (16x16 = 256 codes), caption length (64) and tokenizer come from meta.json.
#
# Size: 16 blocks x 768 wide, 12 heads: 192M parameters with a 16384 codebook (167M with 1024 codes), 15M of
# them the from-scratch text encoder below. 247 GFLOP per image (model.flops_per_sample) make a 90k-image
# epoch 22 PFLOP: ~12 min at 35% MFU of the card's 88 TFLOP/s bf16 peak, ~14 min at 30%. The 20 x 1024
# (385M) model this replaces needed 25-29 min per epoch: with 90k images, more epochs of a model half the size
# are worth more than fewer of a bigger one that begins to memorise sooner.
# A step is 16 images x 2 micro-batches = 32 images = 8,192 code tokens; an epoch is 2,812 steps, and the
# 40k steps below are ~14 epochs, ~8 hours.
#
# Memory: none of this was measured on a GPU yet. `python bench.py train config/muge_16gb.py --estimate_memory
# ...` (BENCHMARKS.md) predicts what the card must hold, reserved memory and CUDA context included: 8.4 GiB at
# batch 16, 12.3 GiB at 32. If it runs out anyway, lower batch_size and raise gradient_accumulation_steps, or
# add --activation_checkpointing=true.
data_dir = "data/muge"
n_layer = 16
n_head = 12
n_embd = 768
dropout = 0.1  # 90k images are few: dropout slows memorising
text_n_layer = 4
text_n_head = 8
text_n_embd = 512
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
max_iters = 40000
eval_interval = 1000
eval_iters = 50
log_interval = 50
