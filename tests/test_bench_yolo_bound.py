"""bench.yolo_bound: the share of each class's objects that keep a cell of YOLOv1's grid."""

from bench.yolo_bound import main

from .datamodules.test_voc import obj, rgb, voc_xml


def test_the_bound_counts_the_objects_that_keep_a_cell(tmp_path, capsys):
    # 100×100: dog A centred (20, 20), cat B (30, 30) in A's cell at S = 2 (B smaller: loses it), cat C alone;
    # a difficult cat is left out as VOC's evaluation leaves it out. S = 4 (25 px cells) separates A and B.
    size = "<size><width>100</width><height>100</height><depth>3</depth></size>"
    objects = (
        obj("dog", "0 0 40 40")
        + obj("cat", "22 22 38 38")
        + obj("cat", "60 60 90 90")
        + obj("cat", "62 62 70 70", "<difficult>1</difficult>")
    )
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "Annotations" / "a.xml").write_text(voc_xml(objects, size=size))
    rgb(100, 100).save(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    means = main(["--root", str(tmp_path), "--split", "test", "--grid", "2", "4"])
    assert means == {2: (1.0 + 0.5) / 2, 4: 1.0}  # cat: 1 of 2 kept at S = 2
    out = capsys.readouterr().out
    assert "| cat | 2 | 0.500 | 1.000 |" in out and "S = 2: mAP@0.5 at most 0.750; 90% of it: 0.675" in out
