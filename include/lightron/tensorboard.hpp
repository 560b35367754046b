// lightron/tensorboard.hpp — TensorBoard scalars written by hand, with neither TensorFlow nor a
// protobuf library. An event file is a sequence of TFRecords, each holding one `Event` message:
//     record   u64le length | u32 masked_crc32c(length's 8 bytes) | data | u32 masked_crc32c(data)
//     masked   ((c >> 15) | (c << 17)) + 0xA282EAD8, c = CRC-32C (polynomial 0x82F63B78)
//     Event    wall_time = 1 (double), step = 2 (varint), file_version = 3 (string),
//              summary = 5 {value = 1 {tag = 1 (string), simple_value = 2 (float)}}
// The first record holds file_version "brain.Event:2", then one record per scalar. Run
// `tensorboard --logdir DIR` where TensorBoard is installed; tests/tensorboard_check.py decodes
// the same bytes independently.
// Leaves out: histograms, images, text and every other summary type; big-endian hosts.
// Introduced in chapter 4 (pretrain_gpt --tensorboard-dir).
#pragma once

#include "core.hpp"

#include <unistd.h>  // gethostname

#include <chrono>
#include <cstdio>
#include <cstring>  // memcpy
#include <ctime>
#include <filesystem>
#include <string>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "TFRecords and protobuf fixed fields are little-endian");

namespace lightron {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): crc32c("123456789") = 0xE3069283.
// Bit by bit: event records are a few dozen bytes.
inline uint32_t crc32c(const std::string& bytes) {
  uint32_t crc = ~0u;
  for (const char byte : bytes) {
    crc ^= static_cast<uint8_t>(byte);
    for (int k = 0; k < 8; ++k) crc = crc & 1 ? 0x82F63B78u ^ (crc >> 1) : crc >> 1;
  }
  return ~crc;
}

// TFRecord stores a rotated CRC plus a constant: a plain CRC of bytes that themselves hold
// CRCs is a weak check.
inline uint32_t masked_crc32c(const std::string& bytes) {
  const uint32_t c = crc32c(bytes);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

// Protocol buffers' wire format, just the pieces an Event needs. A field is a key
// (field_number << 3 | wire_type) followed by its value.
namespace proto {
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

// 7 bits per byte, least significant first; the high bit says "more bytes follow".
inline void varint(std::string& out, uint64_t v) {
  for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
  out += static_cast<char>(v);
}
inline void key(std::string& out, uint32_t field, WireType type) { varint(out, uint64_t(field) << 3 | type); }
template <typename T>  // double -> fixed64, float -> fixed32, raw little-endian bytes
inline void fixed(std::string& out, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}
inline void bytes(std::string& out, uint32_t field, const std::string& value) {  // strings, sub-messages
  key(out, field, kLengthDelimited);
  varint(out, value.size());
  out += value;
}
}  // namespace proto

// Event{wall_time, step, summary {value {tag, simple_value}}}.
inline std::string scalar_event(double wall_time, int64_t step, const std::string& tag, float value) {
  std::string summary_value, summary, event;
  proto::bytes(summary_value, /*field=*/1, tag);
  proto::key(summary_value, /*field=*/2, proto::kFixed32);
  proto::fixed(summary_value, value);
  proto::bytes(summary, /*field=*/1, summary_value);
  proto::key(event, /*field=*/1, proto::kFixed64);
  proto::fixed(event, wall_time);
  proto::key(event, /*field=*/2, proto::kVarint);
  proto::varint(event, static_cast<uint64_t>(step));
  proto::bytes(event, /*field=*/5, summary);
  return event;
}

inline std::string tfrecord(const std::string& data) {
  std::string length, record;
  proto::fixed(length, static_cast<uint64_t>(data.size()));
  record = length;
  proto::fixed(record, masked_crc32c(length));
  record += data;
  proto::fixed(record, masked_crc32c(data));
  return record;
}

inline double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// One event file in `dir` (created if missing): dir/events.out.tfevents.<unix time>.<host>.lightron.
// Records are buffered; flush() after each logged step makes them visible to a live TensorBoard.
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir) {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    require(!error, "tensorboard: cannot create the directory '{}' ({}); check --tensorboard-dir", dir,
            error.message());
    char host[256] = {};
    if (::gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') std::strcpy(host, "localhost");
    path_ = fmt::format("{}/events.out.tfevents.{}.{}.lightron", dir, static_cast<int64_t>(std::time(nullptr)), host);
    file_ = std::fopen(path_.c_str(), "wb");
    require(file_ != nullptr, "tensorboard: cannot open '{}' for writing (is the directory writable?)", path_);
    std::string version;  // Event{wall_time, file_version}: says how to read the rest
    proto::key(version, /*field=*/1, proto::kFixed64);
    proto::fixed(version, unix_seconds());
    proto::bytes(version, /*field=*/3, "brain.Event:2");
    write(version);
    flush();
  }
  ~TensorBoardWriter() {
    if (file_) std::fclose(file_);
  }
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void add_scalar(const std::string& tag, int64_t step, double value) {
    write(scalar_event(unix_seconds(), step, tag, static_cast<float>(value)));
  }
  void flush() { std::fflush(file_); }
  const std::string& path() const { return path_; }

 private:
  void write(const std::string& event) {
    const std::string record = tfrecord(event);
    require(std::fwrite(record.data(), 1, record.size(), file_) == record.size(),
            "tensorboard: writing {} bytes to '{}' failed (is the disk full?)", record.size(), path_);
  }

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace lightron
