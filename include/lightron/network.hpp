// lightron/network.hpp — the socket plumbing that a run on several hosts needs, kept out of
// process_groups.hpp so that the chapter reads as ranks and groups:
//   * which local address this host reaches MASTER_ADDR from (each rank binds its Gloo
//     device there: MASTER_ADDR itself is a local address only on the master's host);
//   * whether a TCP port can still be listened on (rank 0 hosts the rendezvous store);
//   * the hosts of a Slurm node list in its compressed form ("node[01-04,07],gpu3").
// Leaves out: choosing among several interfaces by speed (GLOO_SOCKET_IFNAME names one),
// and Slurm's rarer list syntax beyond prefix[ranges]suffix.
// Introduced in tutorial chapter 1.
#pragma once

#include "core.hpp"

#include <netdb.h>  // getaddrinfo, getnameinfo
#include <sys/socket.h>
#include <unistd.h>  // close

#include <cerrno>
#include <cstring>  // strerror
#include <string>
#include <vector>

namespace lightron {

// The local address of the interface that the route to host:port leaves by, e.g.
// "10.213.0.2". A UDP socket's connect() only picks the route: no packet is sent.
// Throws RuntimeFailure (it is about this host, so this rank says it) when host does not
// resolve or is unreachable.
inline std::string local_address_towards(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found); rc != 0)
    throw RuntimeFailure(fmt::format("MASTER_ADDR '{}' does not resolve on this host ({}): use an address, or a name "
                                     "every host knows",
                                     host, gai_strerror(rc)));
  std::string error = "no address";
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t length = sizeof(local);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0) {
      ::close(fd);
      freeaddrinfo(found);
      char text[NI_MAXHOST] = {};
      getnameinfo(reinterpret_cast<sockaddr*>(&local), length, text, sizeof(text), nullptr, 0, NI_NUMERICHOST);
      return text;
    }
    error = std::strerror(errno);
    ::close(fd);
  }
  freeaddrinfo(found);
  throw RuntimeFailure(fmt::format("no route from this host to MASTER_ADDR '{}' ({}): check the address, or name the "
                                   "interface with GLOO_SOCKET_IFNAME",
                                   host, error));
}

// False when another program already listens on `port` (any address), which is where the
// TCPStore server would bind. SO_REUSEADDR, as the store's own socket: a port that only has
// connections in TIME_WAIT from a previous run counts as free.
inline bool port_is_free(uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;  // no host: the wildcard addresses [::] and 0.0.0.0
  addrinfo* any = nullptr;
  if (getaddrinfo(nullptr, std::to_string(port).c_str(), &hints, &any) != 0) return true;  // the store will say why
  bool in_use = false;
  for (addrinfo* a = any; a != nullptr && !in_use; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;  // e.g. no IPv6 on this host
    const int on = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    in_use = ::bind(fd, a->ai_addr, a->ai_addrlen) != 0 && errno == EADDRINUSE;
    ::close(fd);
  }
  freeaddrinfo(any);
  return !in_use;
}

// "a[01-03]b" -> a01b a02b a03b (ranges keep the zero padding of their first number);
// "gpu3" -> gpu3. Returns {} when the text is not of that form.
inline std::vector<std::string> expand_slurm_host(const std::string& item) {
  const size_t open = item.find('[');
  if (open == std::string::npos) return {item};
  const size_t close = item.find(']', open);
  if (close == std::string::npos || open == 0) return {};
  std::vector<std::string> numbers;
  const std::string ranges = item.substr(open + 1, close - open - 1);
  for (size_t start = 0; start <= ranges.size();) {
    size_t end = ranges.find(',', start);
    if (end == std::string::npos) end = ranges.size();
    const std::string range = ranges.substr(start, end - start);
    const size_t dash = range.find('-');
    const std::string first = range.substr(0, dash), last = dash == std::string::npos ? first : range.substr(dash + 1);
    const bool digits = !first.empty() && !last.empty() && first.find_first_not_of("0123456789") == std::string::npos &&
                        last.find_first_not_of("0123456789") == std::string::npos;
    if (!digits || first.size() > 9 || last.size() > 9 || std::stol(first) > std::stol(last) ||
        std::stol(last) - std::stol(first) > 1000000)  // no allocation is that big: a typo
      return {};
    for (long n = std::stol(first); n <= std::stol(last); ++n) {
      const std::string text = std::to_string(n);
      numbers.push_back(std::string(first.size() > text.size() ? first.size() - text.size() : 0, '0') + text);
    }
    start = end + 1;
  }
  std::vector<std::string> hosts;
  const auto tails = expand_slurm_host(item.substr(close + 1));  // "rack[1-2]-n[1-2]": the rest, recursively
  if (tails.empty()) return {};
  for (const auto& n : numbers)
    for (const auto& tail : tails) hosts.push_back(item.substr(0, open) + n + tail);
  return hosts;
}

// Every host of a Slurm node list, in order: "node[01-02,07],gpu3" -> node01 node02 node07
// gpu3. Returns {} when the text is not a node list (empty, unbalanced brackets, bad ranges).
inline std::vector<std::string> slurm_hosts(const std::string& nodelist) {
  std::vector<std::string> hosts;
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i <= nodelist.size(); ++i) {
    const char c = i < nodelist.size() ? nodelist[i] : ',';
    depth += c == '[' ? 1 : c == ']' ? -1 : 0;
    if (depth < 0 || depth > 1) return {};
    if (c != ',' || depth != 0) continue;  // a comma inside brackets separates ranges, not hosts
    const auto item = expand_slurm_host(nodelist.substr(start, i - start));
    if (item.empty() || item.front().empty()) return {};
    hosts.insert(hosts.end(), item.begin(), item.end());
    start = i + 1;
  }
  return depth == 0 ? hosts : std::vector<std::string>{};
}

}  // namespace lightron
