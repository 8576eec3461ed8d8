# MUGE ECommerce-T2I on one 16 GB GPU (RTX 4070 Ti SUPER class), after `prepare.py --out_dir data/muge`:
#   python train.py config/muge_16gb.py
# Codebook, code grid and tokenizer come from meta.json. 192M parameters; a step is 16 images x 2 micro-batches, and
# 40k steps are ~14 epochs of 90k images. Epoch times and memory estimates: BENCHMARKS.md, "The 16 GB recipe".
# Out of memory: lower batch_size and raise gradient_accumulation_steps, or add --activation_checkpointing=true.
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
