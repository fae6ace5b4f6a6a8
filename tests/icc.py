"""ICC profiles for the colour-management tests."""

import struct

from PIL import ImageCms


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and green colorants exchanged, as a display profile: a valid RGB profile that is clearly
    not sRGB."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack_from(">I", icc, 128)[0]
    entries = {bytes(icc[132 + 12 * i: 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = entries[b"rXYZ"], entries[b"gXYZ"]
    icc[r + 4: r + 12], icc[g + 4: g + 12] = icc[g + 4: g + 12], icc[r + 4: r + 12]
    icc[12:16] = b"mntr"
    return bytes(icc)
