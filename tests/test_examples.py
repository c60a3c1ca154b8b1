"""The examples, run briefly as their users run them (``python -m fastrnn.examples.NAME``) with a
fixed seed and few steps: each must print its metric last and beat a threshold that a model
which learned nothing misses (chance, or the majority class for the tagger).

The full runs (the README's figures) take the default steps; these take a fraction of them.
"""
import re
import subprocess
import sys

import pytest

from conftest import child_python

# name -> (arguments, pattern of the last line, threshold of the metric, what learning nothing
# scores). Thresholds sit well below what these seeds reach (classify 1.0, tag 0.67,
# translate 0.71 with these steps) and well above the untrained score.
EXAMPLES = {
    "classify": (["--steps", "150"],
                 r"classify: accuracy (\d\.\d{3}) on 2000 held-out sentences "
                 r"\(bag-of-tokens baseline (\d\.\d{3})\)", 0.85, 0.5),
    "tag": (["--steps", "60"],
            r"tag: per-character accuracy (\d\.\d{3}) on [\d,]+ characters of \d held-out "
            r"modules", 0.5, 0.3),
    "translate": (["--steps", "400"],
                  r"translate: exact match (\d\.\d{3}) on 2,000 held-out dates", 0.4, 0.0),
}


def run_example(name, args):
    result = subprocess.run([sys.executable, "-m", f"fastrnn.examples.{name}", "--seed", "0",
                             "--backend", "auto", *args],
                            capture_output=True, text=True, timeout=300, **child_python())
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_learns(name):
    args, pattern, threshold, untrained = EXAMPLES[name]
    result = run_example(name, args)
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(pattern, last)
    assert match, f"last line {last!r} is not {pattern!r}"
    metric = float(match.group(1))
    assert untrained < threshold <= metric, (name, metric)
    assert "training: 100%" in result.stderr        # tqdm's progress bar
    if name == "classify":
        baseline = float(match.group(2))
        assert baseline < 0.7, "word order no longer defeats the bag-of-tokens baseline"


def test_classify_untrained_misses_the_threshold():
    """The threshold can fail: one update leaves the classifier at chance."""
    _, pattern, threshold, _ = EXAMPLES["classify"]
    result = run_example("classify", ["--steps", "1"])
    metric = float(re.fullmatch(pattern, result.stdout.strip().splitlines()[-1]).group(1))
    assert metric < threshold


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, "-m", "fastrnn.examples.translate", "--steps", "0"],
                            capture_output=True, text=True, timeout=120, **child_python())
    assert result.returncode == 2
    assert "--steps: expected an integer >= 1, got 0" in result.stderr


def test_tag_labels_follow_tokenize_by_hand():
    """The tagger's data: every character of a snippet labelled as tokenize reads it."""
    from fastrnn.examples.tag import CLASSES, label
    source = 'if x1 == "if":  # no\n    y = 0x1F\n'
    short = {"whitespace": "_", "name": "n", "keyword": "k", "number": "0", "string": "s",
             "comment": "c", "operator": "o"}
    got = "".join(short[CLASSES[c]] for c in label(source))
    assert got == "kk_nn_oo_sssso__cccc_" + "____n_o_0000_"
