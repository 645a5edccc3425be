def decrypt_nodes(
    mht: bytes | bytearray | memoryview,
    first_slot: int,
    src: bytes | bytearray | memoryview,
    out: bytearray | memoryview,
    n: int,
    /,
) -> int: ...
