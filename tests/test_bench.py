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
