"""The ML-Images class dictionary and semantic hierarchy, and its ancestor closure in Spark.

The file has a header line, then ``index<TAB>wnid<TAB>parent_index<TAB>names``; the 4 roots have
parent -1 and a parent may come after its child. The closure is a DataFrame of
``(class, ancestor, distance)`` that includes each class itself at distance 0, so joining labels
with it keeps the labels and adds their ancestors in one step.
"""
import dataclasses
import logging

log = logging.getLogger(__name__)

ROOT_PARENT = -1


class HierarchyError(ValueError):
    """The hierarchy file is malformed; the message names the file, line and problem."""


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    parent: int
    name: str


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    classes: tuple  # ClassInfo, position == index

    def __len__(self):
        return len(self.classes)

    def name(self, index: int) -> str:
        return self.classes[index].name

    def parents(self) -> list:
        return [c.parent for c in self.classes]


def _parse_line(path, number, line):
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < 3:
        raise HierarchyError(f"{path}:{number}: expected index, wnid, parent, names; got {line!r}")
    try:
        index, parent = int(fields[0]), int(fields[2])
    except ValueError:
        raise HierarchyError(
            f"{path}:{number}: index and parent must be integers, got {fields[0]!r}, {fields[2]!r}"
        ) from None
    name = " ".join(fields[3:]).strip() if len(fields) > 3 else ""
    return ClassInfo(index, fields[1].strip(), parent, name), number


def _check_links(path, rows):
    """Contiguous indexes, unique wnids, parents that exist; rows are (ClassInfo, line)."""
    wnid_line = {}
    for position, (info, number) in enumerate(rows):
        if info.index != position:
            raise HierarchyError(
                f"{path}:{number}: index {info.index} breaks the 0..n-1 sequence "
                f"(expected {position})")
        if info.wnid in wnid_line:
            raise HierarchyError(
                f"{path}:{number}: WordNet id {info.wnid} already used on line "
                f"{wnid_line[info.wnid]}")
        wnid_line[info.wnid] = number
    for info, number in rows:
        if info.parent != ROOT_PARENT and not 0 <= info.parent < len(rows):
            raise HierarchyError(f"{path}:{number}: parent {info.parent} of class {info.index} "
                                 "does not exist")
        if info.parent == info.index:
            raise HierarchyError(f"{path}:{number}: class {info.index} is its own parent")


def _check_acyclic(path, rows):
    parents = [info.parent for info, _ in rows]
    state = [0] * len(parents)  # 0 unknown, 1 on current path, 2 reaches a root
    for start in range(len(parents)):
        path_nodes, node = [], start
        while node != ROOT_PARENT and state[node] == 0:
            state[node] = 1
            path_nodes.append(node)
            node = parents[node]
        if node != ROOT_PARENT and state[node] == 1:
            raise HierarchyError(
                f"{path}:{rows[node][1]}: class {node} is its own ancestor (a cycle)")
        for visited in path_nodes:
            state[visited] = 2


def load_hierarchy(path: str) -> Hierarchy:
    """Reads and validates the hierarchy file; raises :class:`HierarchyError` on any defect."""
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        try:
            lines = handle.read().split("\n")  # as iterating the file would split it
        except UnicodeDecodeError as err:
            raise HierarchyError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                                 "expected the tab-separated hierarchy file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if number == 1 and not line.split("\t", 1)[0].strip().lstrip("-").isdigit():
            continue  # header
        rows.append(_parse_line(path, number, line))
    if not rows:
        raise HierarchyError(f"{path}: no classes found")
    _check_links(path, rows)
    _check_acyclic(path, rows)
    log.info("hierarchy %s: %d classes", path, len(rows))
    return Hierarchy(tuple(info for info, _ in rows))


def classes_frame(spark, hierarchy: Hierarchy):
    """DataFrame ``(class int, wnid string, parent int, name string)``."""
    rows = [(c.index, c.wnid, c.parent, c.name) for c in hierarchy.classes]
    return spark.createDataFrame(rows, "class int, wnid string, parent int, name string")


def ancestor_closure(spark, hierarchy: Hierarchy):
    """``(class, ancestor, distance)`` for every class and each of its ancestors, self included.

    Built by Spark with iterative self-joins of the known paths until no new path appears.
    Each round joins every path with every path that continues it, so the longest path found
    doubles per round: the deepest class (16 edges) takes 5 rounds plus one that finds nothing.
    """
    from pyspark.sql import functions as F

    paths = (classes_frame(spark, hierarchy)
             .where(F.col("parent") != ROOT_PARENT)
             .select("class", F.col("parent").alias("ancestor"), F.lit(1).alias("distance"))
             .localCheckpoint())
    known = paths.count()
    for _ in range(len(hierarchy)):
        head, tail = paths.alias("head"), paths.alias("tail")
        longer = (head.join(tail, F.col("head.ancestor") == F.col("tail.class"))
                  .select("head.class", F.col("tail.ancestor"),
                          (F.col("head.distance") + F.col("tail.distance")).alias("distance")))
        paths = (paths.unionByName(longer).groupBy("class", "ancestor")
                 .agg(F.min("distance").alias("distance"))
                 .coalesce(1).localCheckpoint())
        found = paths.count()
        if found == known:
            break
        known = found
    itself = classes_frame(spark, hierarchy).select(
        "class", F.col("class").alias("ancestor"), F.lit(0).alias("distance"))
    return itself.unionByName(paths).coalesce(1)


@dataclasses.dataclass(frozen=True)
class HierarchyFacts:
    classes: int
    roots: dict  # root index -> subtree size (root included)
    leaves: int
    max_depth: int  # edges on the deepest root-to-class path
    ancestor_pairs: int  # (class, proper ancestor) pairs
    mean_depth: float  # ancestor_pairs / classes

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["roots"] = {str(k): v for k, v in self.roots.items()}
        return out


def hierarchy_facts(closure, classes) -> HierarchyFacts:
    """Counts computed by Spark from the closure and the class table."""
    from pyspark.sql import functions as F

    n_classes = classes.count()
    roots = classes.where(F.col("parent") == ROOT_PARENT).select("class")
    subtree = (closure.join(roots, closure.ancestor == roots["class"], "left_semi")
               .groupBy("ancestor").count().collect())
    parents = classes.select(F.col("parent").alias("class")).distinct()
    leaves = classes.join(parents, "class", "left_anti").count()
    proper = closure.where(F.col("distance") > 0)
    stats = proper.agg(F.count("*").alias("pairs"), F.max("distance").alias("deepest")).first()
    pairs = int(stats["pairs"])
    return HierarchyFacts(
        classes=n_classes,
        roots={int(r["ancestor"]): int(r["count"]) for r in sorted(subtree)},
        leaves=leaves,
        max_depth=int(stats["deepest"] or 0),
        ancestor_pairs=pairs,
        mean_depth=round(pairs / n_classes, 4),
    )
