"""Every section of README.md is checked: the sections that quote results by their own figure
tests (test_figures_speed, test_figures_qat, ...), the rest here, where each number must be
declared setup (widths, counts, the analytic 6.02 dB per bit), never a measured figure.
A new section with no check fails ``test_every_readme_section_is_checked``."""

import pytest
from figures import check_section, headings

README = "README.md"
# sections whose figures other tests check against results files
CHECKED_ELSEWHERE = {
    "Compared with AQT, Qwix and TFLite (measured here, not claimed)": "test_figures_speed",
    "Speed": "test_figures_speed",
    "Training step with quantized backward products": "test_figures_speed",
    "QAT on MNIST-1D": "test_figures_qat",
    "Papers": "test_figures_qat",
    "LLM post-training quantization (small GPT)": "test_figures_papers",
    "QAT against Qwix and AQT": "test_figures_qat_accuracy",
    "Accelerator benchmarking": "test_bench_grid",
    "Export": "test_figures_export",
    "Formats": "test_figures_formats",
}
# the rest: their own text only, with the numbers that are setup
SETUP = {
    "jquant": ["10", "2"],  # 10 single-op golden cases; two set-up commands
    "A first example": ["0", "1024"],
    "Your own format": [],
    "Layout": [],
    "Command line": ["2"],  # exit status 2
    "Sweeps on several devices and hosts": ["0", "4"],
    "Mixed precision under a size budget": ["8", "3000", "32", "2"],
    "Results": [],
    "Tests": ["10", "0", "1960", "2019", "6.02"],  # golden cases, 0 mismatches, papers' years
}


@pytest.mark.parametrize("heading", sorted(SETUP))
def test_section_prints_only_setup_numbers(heading):
    check_section(README, heading, {}, SETUP[heading], own=True)


def test_every_readme_section_is_checked():
    # headings of code comments are not sections; "jquant" is the title
    missing = set(headings(README)) - set(SETUP) - set(CHECKED_ELSEWHERE)
    assert not missing, f"README sections with no figures check: {sorted(missing)}"
