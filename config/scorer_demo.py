# The demo's text-image scorer, which grades R-precision in evaluate.py: `python train.py config/scorer_demo.py`
# trains it into out/grader, about a minute and a half on two CPU cores.
model = "scorer"
out_dir = "out/grader"
n_layer = 2
n_head = 4
n_embd = 128
text_n_layer = 2
text_n_head = 4
text_n_embd = 128
batch_size = 64
max_iters = 300
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
eval_interval = 100
eval_iters = 4
log_interval = 20
