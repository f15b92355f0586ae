// SHA-256 of a byte string, hex encoded: the loader checks each image against its manifest row before loading it.
#pragma once

#include <string>

namespace fa2rt {
std::string sha256_hex(const std::string& data);
}
