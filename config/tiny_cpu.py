# A model small enough to train in seconds on a laptop CPU: used by the tests and `python bench.py train`.
n_layer = 2
n_head = 2
n_embd = 64
text_n_layer = 1
text_n_head = 2
text_n_embd = 32
batch_size = 4
max_iters = 50
warmup_iters = 5
eval_interval = 10
eval_iters = 2
log_interval = 1
learning_rate = 3e-3
min_lr = 3e-4
device = "cpu"
