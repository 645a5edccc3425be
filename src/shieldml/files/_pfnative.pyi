def decrypt_nodes(
    mht: bytes | bytearray | memoryview,
    first_slot: int,
    src: bytes | bytearray | memoryview,
    out: bytearray | memoryview,
    n: int,
    /,
) -> int: ...
def encrypt_nodes(
    keys: bytes | bytearray | memoryview,
    src: bytes | bytearray | memoryview,
    out: bytearray | memoryview,
    mht: bytearray | memoryview,
    first_slot: int,
    n: int,
    /,
) -> None: ...
