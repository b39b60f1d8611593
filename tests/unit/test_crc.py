import zlib

from qmtl.common.crc import crc32_of_node_ids


def test_empty_is_zero():
    assert crc32_of_node_ids([]) == 0


def test_single_id_is_plain_crc32():
    assert crc32_of_node_ids(["abc"]) == zlib.crc32(b"abc")


def test_chaining_equals_crc_of_concatenated_utf8():
    ids = ["a1", "b2", "ünï", "x" * 64]
    assert crc32_of_node_ids(ids) == zlib.crc32("".join(ids).encode("utf-8"))


def test_order_matters_and_accepts_iterables():
    ids = ["n1", "n2", "n3"]
    assert crc32_of_node_ids(ids) != crc32_of_node_ids(reversed(ids))
    assert crc32_of_node_ids(i for i in ids) == crc32_of_node_ids(ids)


def test_pinned_value_and_unsigned_range():
    assert crc32_of_node_ids(["a", "b", "ü"]) == 3415026462
    for ids in (["a"], ["zz", "yy"], [str(i) for i in range(1000)]):
        assert 0 <= crc32_of_node_ids(ids) <= 0xFFFFFFFF
