"""loadtests/gpu/modes.py packs its report folders into one archive (the device returns few, small files)."""

from __future__ import annotations

import tarfile

from loadtests.gpu.modes import pack_reports


def test_pack_reports_archives_only_report_folders(tmp_path):
    (tmp_path / "through-gateway").mkdir()
    (tmp_path / "through-gateway" / "report.json").write_text("{}")
    (tmp_path / "through-gateway" / "requests.jsonl").write_text("x\n")
    (tmp_path / "not-a-report").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    archive = pack_reports(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-report", "reports.tar.gz", "summary.json"]
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["through-gateway", "through-gateway/report.json",
                                          "through-gateway/requests.jsonl"]
    assert pack_reports(tmp_path / "not-a-report") is None
