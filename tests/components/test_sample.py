"""The sample stage's grid: which prompts a person sees in samples.png."""

from dalle_pipeline.components.sample.run import grid_rows


def test_the_grid_spreads_its_rows_over_every_prompt_so_the_zero_shot_pairs_at_the_end_show():
    # the tiny preset: 32 held-out captions, then 16 zero-shot prompts, 8 grid rows
    rows = grid_rows(48, 8)
    assert len(rows) == 8 and rows[0] == 0 and rows[-1] == 47
    assert sum(row >= 32 for row in rows) >= 2  # the zero-shot pairs are in the picture
    assert grid_rows(3, 8) == [0, 1, 2] and grid_rows(5, 1) == [0]
