import json

from lookahead.benchmarks.report import write_report


def test_a_report_is_the_record_as_json_the_table_as_markdown_and_the_figure(tmp_path):
    drawn = []

    def draw(plt):
        fig, ax = plt.subplots()
        ax.plot([1, 2], [3, 4])
        drawn.append(fig)
        return fig

    write_report(tmp_path / "out", "run", {"tokens_per_s": 12.5}, "| a |\n|---|\n", draw)
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {"tokens_per_s": 12.5}
    assert (tmp_path / "out" / "run.md").read_text() == "| a |\n|---|\n"
    assert drawn and (tmp_path / "out" / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(tmp_path / "out", "bare", {}, "x")
    assert not (tmp_path / "out" / "bare.png").exists()
