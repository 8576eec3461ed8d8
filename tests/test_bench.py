import sys

import bench


def test_a_part_that_runs_out_of_time_keeps_what_it_measured(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text('import time\nprint(\'RESULT {"images_per_s": 5}\', flush=True)\ntime.sleep(60)\n')
    assert bench.run_part("slow", [sys.executable, str(script)], limit=2) == {"images_per_s": 5, "part": "slow",
                                                                             "rc": "timeout"}


def test_a_part_that_fails_returns_its_log(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit('out of memory')\n")
    result = bench.run_part("fails", [sys.executable, str(script)], limit=30)
    assert result["rc"] == 1 and "out of memory" in result["log_tail"]


def test_the_documented_commands_parse():
    documented = {  # BENCHMARKS.md, the Makefile and the gpu part's own commands
        "gpu --out bench_gpu.json": {"budget": 480},
        "app --ckpt out/best.pt": {"max_batch": 16, "pictures": 4},
        "prepare --vqgan small --image_size 64 --rows 2000,8000": {"rows": [2000, 8000]},
        "steps config/muge_16gb.py --device cpu --batch_size 1,8 --no_cache": {"batch_size": [1, 8], "no_cache": True},
        "vqgan --batch_size 8 --n_embed 16384": {"n_embed": 16384, "compile": False},
        "vqgan-train --ckpt assets/vqgan_demo.pt --image_size 64 --batch_size 16 --repeat 5": {"repeat": 5},
        "generate config/muge_16gb.py --device cuda --vqgan f16_1024 --limit 0 --batch_size 256": {"batch_size": [256]},
        "train config/muge_16gb.py --steps 3 --batch_size=1 --gradient_accumulation_steps=1 --codebook_size 16384 "
        "--rows 64 --estimate_memory --device=cpu": {"codebook_size": 16384, "rows": 64, "estimate_memory": True},
    }
    parser = bench.build_parser()
    for command, expected in documented.items():
        args, rest = parser.parse_known_args(command.split())
        assert {k: getattr(args, k) for k in expected} == expected, command
        assert rest == (["--batch_size=1", "--gradient_accumulation_steps=1", "--device=cpu"]
                        if args.part == "train" else []), command
