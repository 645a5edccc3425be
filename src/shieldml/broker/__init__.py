"""The key broker: releases keys only to attested TEEs whose evidence passes the key's policy."""
