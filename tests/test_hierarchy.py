"""The hierarchy loader's checks, and the closure's facts on the real file."""
import pytest

from mlimages import hierarchy

HEADER = "category_index\tcategory_id\tindex_of_parent_category\tcategory name\n"


def _write(tmp_path, rows):
    path = tmp_path / "h.txt"
    path.write_text(HEADER + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_real_file_facts(spark, class_hierarchy):
    closure = hierarchy.ancestor_closure(spark, class_hierarchy)
    facts = hierarchy.hierarchy_facts(closure, hierarchy.classes_frame(spark, class_hierarchy))
    assert facts.classes == 11166
    assert facts.roots == {0: 67, 1: 1046, 2: 10038, 3: 15}
    assert facts.leaves == 9219
    assert facts.max_depth == 16
    assert facts.ancestor_pairs == 83422
    assert facts.mean_depth == 7.4711


def test_closure_matches_parent_walk(spark, class_hierarchy):
    parents = class_hierarchy.parents()
    expected = set()
    for node in range(len(parents)):
        ancestor, distance = node, 0
        while ancestor != -1:
            expected.add((node, ancestor, distance))
            ancestor, distance = parents[ancestor], distance + 1
    closure = hierarchy.ancestor_closure(spark, class_hierarchy).collect()
    assert {(r["class"], r["ancestor"], r["distance"]) for r in closure} == expected
    assert len(closure) == len(expected) == 83422 + 11166


def test_forward_parent_reference_is_allowed(tmp_path):
    # On the real file class 9741's parent is 10348, further down; the same shape here:
    loaded = hierarchy.load_hierarchy(_write(tmp_path, [
        (0, "n00000001", -1, "root"), (1, "n00000002", 2, "child"),
        (2, "n00000003", 0, "parent, kid")]))
    assert loaded.parents() == [-1, 2, 0]
    assert loaded.name(2) == "parent, kid"


@pytest.mark.parametrize("rows, message", [
    ([(0, "n1", -1, "a"), (2, "n2", 0, "b")], r"h.txt:3: index 2 breaks the 0..n-1"),
    ([(0, "n1", -1, "a"), (1, "n2", 7, "b")], r"h.txt:3: parent 7 of class 1 does not exist"),
    ([(0, "n1", -1, "a"), (1, "n1", 0, "b")], r"h.txt:3: WordNet id n1 already used on line 2"),
    ([(0, "n1", -1, "a"), (1, "n2", 2, "b"), (2, "n3", 1, "c")], r"its own ancestor"),
    ([(0, "n1", -1, "a"), (1, "n2", 1, "b")], r"h.txt:3: class 1 is its own parent"),
    ([(0, "n1", -1, "a"), ("x", "n2", 0, "b")], r"h.txt:3: index and parent must be integers"),
    ([(0, "n1")], r"h.txt:2: expected index, wnid, parent, names"),
])
def test_broken_files_name_line_and_problem(tmp_path, rows, message):
    with pytest.raises(hierarchy.HierarchyError, match=message):
        hierarchy.load_hierarchy(_write(tmp_path, rows))
