# MUGE ECommerce-T2I on one 16 GB GPU (RTX 4070 Ti SUPER class), after `prepare.py --out_dir data/muge`:
#   python train.py config/muge_16gb.py
# The codebook, code grid (16x16 = 256 codes), caption length (64) and tokenizer come from meta.json.
#
# Size: 20 blocks x 1024 wide, 16 heads; with a 16384 codebook 385M parameters (353M with 1024 codes),
# of which 15M are the from-scratch text encoder below (a pretrained encoder named by prepare.py replaces it).
# A step is 16 images x 2 micro-batches = 32 images = 8,192 code tokens; a 90k-image epoch is 2,812 steps.
#
# Everything below is an estimate; none of it was measured on a GPU (none was available to us).
# Memory, from `python bench.py train config/muge_16gb.py --estimate_memory ...` (BENCHMARKS.md): fp32
# weights, grads and AdamW moments 5.7 GiB, bf16 weight copies 0.7 GiB, 276 MiB of activations and 24 MiB of
# logit gradients per image, so ~11.1 GiB allocated at batch 16, ~12.5 GiB with the CUDA context and
# allocator slack: about 3 GiB spare on a 16 GiB card. If it runs out anyway, add
# `--activation_checkpointing true`, or halve batch_size and double gradient_accumulation_steps.
# Time: 518 GFLOP per image (model.flops_per_sample), 4.7e16 FLOP per epoch. The card's dense bf16 peak is
# ~88 TFLOP/s (see model.PEAK_BF16_FLOPS); at an assumed 30-40% MFU an epoch takes ~22-29 minutes, and the
# 60k steps below (~21 epochs) ~8-10 hours.
data_dir = "data/muge"
n_layer = 20
n_head = 16
n_embd = 1024
dropout = 0.1  # 90k images are few for this size; dropout slows overfitting
text_n_layer = 4
text_n_head = 8
text_n_embd = 512
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 1000
max_iters = 60000
eval_interval = 1000
eval_iters = 50
log_interval = 50
