# The demo's tokenizer, assets/vqgan_demo.pt: `python -m vqgan.train config/vqgan_demo.py` (after
# `python prepare.py` has written data/demo_src), then copy out/vqgan_demo/vqgan.pt there. 64 px pictures
# become 8x8 grids over 512 codes. From scratch, codes kept at running means (codebook_ema), a small embed_dim
# and a squared-error term learn within the CPU's budget (BENCHMARKS.md has the comparison).
data = ["data/demo_src/T2I_train.img.tsv"]
val_data = ["data/demo_src/T2I_val.img.tsv"]
out_dir = "out/vqgan_demo"
image_size = 64
ch = 32
ch_mult = (1, 1, 2, 2)
num_res_blocks = 1
attn_levels = ()
z_channels = 32
embed_dim = 8
n_embed = 512
codebook_ema = 0.99
l2_weight = 10.0
batch_size = 16
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 100
max_iters = 2400
eval_interval = 400
