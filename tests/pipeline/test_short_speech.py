"""Speech shorter than one chunk renders as one chunk cut to the speech, as the reference's loop.

The fixtures come from the reference's own `generate_infinitetalk` with its short-speech gate
removed (tools/parity/make_short_speech_fixture.py says why and how): it clamps the first
chunk's audio windows to the speech, renders a second chunk and cuts the video to the speech,
which leaves the first chunk's frames only. The tiny model's chunk is 33 frames.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import torch

from pipeline import InfiniteTalkPipeline, windows
from tests.helpers.parity import load_tool, read_fixture, render_capturing


@pytest.mark.parametrize(("case", "frames"), [("sampler_short", 20), ("sampler_short_33", 33)])
def test_short_speech_equals_the_reference_loop(
    plain_pipe: InfiniteTalkPipeline, tmp_path: Path, case: str, frames: int
) -> None:
    tool = load_tool("make_short_speech_fixture")
    tensors, meta = read_fixture(case)
    expected = tensors["latents"]
    assert int(meta["video_frames"]) == frames  # the reference's video: cut to the speech
    image, audio = tool.make_media(tmp_path, case)
    result, captured = render_capturing(plain_pipe, tool.request_for(image, audio), tmp_path / "out.mp4")
    assert len(captured) == 1  # the reference's second chunk is cut away entirely: not rendered
    print(f"{case}: max |ours - reference| = {(captured[0] - expected).abs().max():.3e}")
    torch.testing.assert_close(captured[0], expected, rtol=1e-4, atol=1e-4)
    assert result.num_frames == frames
    with av.open(str(result.video_path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == frames


def test_plan_of_short_speech() -> None:
    for mode in ("streaming", "clip"):
        plan = windows.plan_chunks(20, frame_num=33, motion_frame=9, max_frame_num=None, mode=mode)
        assert plan.starts == (0,) and plan.total_frames == 20 and plan.new_frames(0) == (0, 20)
    capped = windows.plan_chunks(20, frame_num=33, motion_frame=9, max_frame_num=12, mode="streaming")
    assert capped.total_frames == 12
    one = windows.plan_chunks(1, frame_num=81, motion_frame=9, max_frame_num=None, mode="streaming")
    assert one.total_frames == 1
    # longer speech is planned as before
    assert (
        windows.plan_chunks(34, frame_num=33, motion_frame=9, max_frame_num=None, mode="clip").total_frames
        == 33
    )


@pytest.mark.parametrize("rows", [1, 20, 33, 34, 35, 100])
def test_first_chunk_windows_are_the_reference_clamp(rows: int) -> None:
    """Chunk 0 reads rows `clamp(frame + offset, 0, T - 1)` (the reference before it pads), even
    when the plan's end lies past the speech; a later chunk still reads the mirrored tail."""
    feats = torch.arange(float(rows)).reshape(rows, 1, 1)
    frame_num = 33
    plan = windows.plan_chunks(
        rows, frame_num=frame_num, motion_frame=9, max_frame_num=None, mode="streaming"
    )
    centres = torch.arange(frame_num)[:, None] + torch.tensor(windows.WINDOW_OFFSETS)[None]
    reference = feats[torch.clamp(centres, 0, rows - 1)]
    torch.testing.assert_close(windows.chunk_audio(feats, 0, frame_num, plan.end), reference)
    if plan.num_chunks > 1:
        start = plan.starts[1]
        padded = windows.pad_features(feats, start + frame_num)
        torch.testing.assert_close(
            windows.chunk_audio(feats, start, frame_num, plan.end),
            windows.chunk_audio(padded, start, frame_num),
        )
