"""The data split of the Rust code, for the offline scripts beside it (importable as `splits`)."""


def fnv1a(s):
    """64-bit FNV-1a of a string's UTF-8 bytes, as `stancemix::data::is_dev` computes it."""
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


def fold(id_):
    """The id's fold, 0-9; fold 0 is the dev split (`data::is_dev`)."""
    return fnv1a(id_) % 10
