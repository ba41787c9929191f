// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// PEFT's pattern keys (rank_pattern, alpha_pattern) matched in time linear in the module name:
// a compiled key runs as a Pike VM (a set of NFA states advanced one character at a time), so no
// key from a file can make matching backtrack exponentially, as std::regex did.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {

/// Longest pattern key or module name matched (a cap on the matcher's work per pair).
inline constexpr std::size_t max_pattern_name = 1024;

namespace detail {

/**
 * One pattern key compiled once, matched as PEFT's get_pattern_key does: Python's
 * `re.match(r"(.*\.)?(" + key + r")$", module)`. Supported: literal characters, `\`-escaped
 * punctuation, `.`, `\d \w \s \D \W \S`, classes `[...]` with ranges and `^`, groups `(...)` and
 * `(?:...)`, `|`, `* + ?` (lazy forms too: they only change which match, not whether), `^` and
 * `$`. Anything else (backreferences, lookaround, `{m,n}`, named groups, flags) is refused with a
 * config_error naming the key: no PEFT config needs them. `.` does not match '\n', as in Python.
 * Matching works on bytes (a non-ASCII character is several bytes to `.`).
 */
class PatternKey {
 public:
  explicit PatternKey(std::string key) : key_(std::move(key)) {
    if (key_.size() > max_pattern_name) {
      fail("is " + std::to_string(key_.size()) + " characters, longer than the " +
           std::to_string(max_pattern_name) + " allowed");
    }
    if (compile_literal()) return;
    // (.*\.)? then (key) then $: the whole name must match.
    const std::size_t split = emit(Op::split);
    const std::size_t loop = emit(Op::split);
    emit(Op::any);
    emit(Op::jump, loop);
    prog_[loop].y = prog_.size();
    emit_char('.');
    prog_[split].y = prog_.size();
    prog_[loop].x = loop + 1;
    prog_[split].x = split + 1;
    pos_ = 0;
    parse_alternation(0);
    if (pos_ != key_.size()) fail("has an unmatched ')' at offset " + std::to_string(pos_));
    emit(Op::end);
    emit(Op::match);
  }

  const std::string& key() const noexcept { return key_; }
  /// True for keys matched without the NFA (names, dots, `\.`, `^`, `$`).
  bool is_literal() const noexcept { return prog_.empty(); }
  /// Steps one match may take per character of the module name (for work budgets).
  std::size_t cost_per_char() const noexcept { return is_literal() ? 1 : prog_.size(); }

  bool matches(const std::string& module) const {
    if (module.size() > max_pattern_name) {
      PEFT_THROW(config_error("module name of " + std::to_string(module.size()) +
                              " characters is longer than the " + std::to_string(max_pattern_name) +
                              " a pattern key is matched against"));
    }
    return is_literal() ? match_literal(module) : run(module);
  }

 private:
  enum class Op : std::uint8_t { ch, any, set, split, jump, begin, end, match };
  struct Inst {
    Op op;
    unsigned char c = 0;
    std::size_t x = 0, y = 0;  // jump/split targets; set index for Op::set
  };

  [[noreturn]] void fail(const std::string& what) const {
    const std::string shown = key_.size() > 80 ? key_.substr(0, 80) + "..." : key_;
    PEFT_THROW(config_error("pattern key '" + shown + "' " + what));
  }

  std::size_t emit(Op op, std::size_t x = 0) {
    prog_.push_back(Inst{op, 0, x, 0});
    return prog_.size() - 1;
  }
  void emit_char(unsigned char c) { prog_.push_back(Inst{Op::ch, c, 0, 0}); }

  // ---- the literal fast path: [^] (char | \punct | .)* [$] ------------------------------------

  bool compile_literal() {
    std::size_t i = 0, end = key_.size();
    if (i < end && key_[i] == '^') anchored_ = true, ++i;
    if (end > i && key_[end - 1] == '$' && (end < 2 || key_[end - 2] != '\\')) --end;
    for (; i < end; ++i) {
      char c = key_[i];
      if (c == '\\') {
        if (i + 1 >= end || !is_punct(key_[i + 1])) return clear_literal();
        literal_.push_back(key_[++i]);
        wildcard_.push_back(false);
        continue;
      }
      if (is_special(c)) return clear_literal();
      literal_.push_back(c);
      wildcard_.push_back(c == '.');
    }
    return true;
  }
  bool clear_literal() {
    literal_.clear();
    wildcard_.clear();
    anchored_ = false;
    return false;
  }

  bool literal_at(const std::string& s, std::size_t at) const {
    for (std::size_t k = 0; k < literal_.size(); ++k) {
      const char c = s[at + k];
      if (wildcard_[k] ? c == '\n' : c != literal_[k]) return false;
    }
    return true;
  }

  bool match_literal(const std::string& m) const {
    const std::size_t n = literal_.size();
    if (m.size() == n) return literal_at(m, 0);
    // The optional prefix `.*\.` is a run without '\n' ending in '.'.
    if (anchored_ || m.size() < n + 1 || m[m.size() - n - 1] != '.') return false;
    for (std::size_t k = 0; k + n + 1 < m.size(); ++k)
      if (m[k] == '\n') return false;
    return literal_at(m, m.size() - n);
  }

  static bool is_special(char c) {
    switch (c) {
      case '*':
      case '+':
      case '?':
      case '(':
      case ')':
      case '[':
      case ']':
      case '{':
      case '}':
      case '|':
      case '^':
      case '$':
      case '\\':
        return true;
      default:
        return false;
    }
  }
  static bool is_punct(char c) {
    return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x40) || (c >= 0x5b && c <= 0x60) ||
           (c >= 0x7b && c <= 0x7e);
  }

  // ---- the NFA ---------------------------------------------------------------------------------

  bool more() const noexcept { return pos_ < key_.size(); }

  // a|b|c as split(a, split(b, c)) with a jump to the end after each branch; iterative, so a
  // long list of alternatives costs no recursion.
  void parse_alternation(int depth) {
    if (depth > 64) fail("nests groups deeper than 64");
    std::vector<std::size_t> jumps;
    std::size_t branch = prog_.size();
    parse_sequence(depth);
    while (more() && key_[pos_] == '|') {
      ++pos_;
      prog_.insert(prog_.begin() + std::ptrdiff_t(branch), Inst{Op::split, 0, branch + 1, 0});
      for (std::size_t p = branch + 1; p < prog_.size(); ++p)
        if (prog_[p].op == Op::split || prog_[p].op == Op::jump) prog_[p].x += 1, prog_[p].y += 1;
      jumps.push_back(emit(Op::jump));
      prog_[branch].y = prog_.size();
      branch = prog_.size();
      parse_sequence(depth);
    }
    for (std::size_t j : jumps) prog_[j].x = prog_.size();
  }

  void parse_sequence(int depth) {
    while (more() && key_[pos_] != '|' && key_[pos_] != ')') parse_repeat(depth);
  }

  void parse_repeat(int depth) {
    const std::size_t start = prog_.size();
    parse_atom(depth);
    while (more()) {
      const char q = key_[pos_];
      if (q == '{') fail("uses a {m,n} repetition, which peft does not support");
      if (q != '*' && q != '+' && q != '?') return;
      ++pos_;
      if (more() && key_[pos_] == '?') ++pos_;  // lazy: the same yes/no answer
      if (more() && (key_[pos_] == '*' || key_[pos_] == '+')) fail("has a repeated repetition");
      wrap(start, q);
    }
  }

  // Wraps prog_[start, end) in the quantifier q, shifting its jump targets.
  void wrap(std::size_t start, char q) {
    std::vector<Inst> body(prog_.begin() + std::ptrdiff_t(start), prog_.end());
    prog_.resize(start);
    const auto copy_body = [&](std::size_t shift) {
      for (Inst inst : body) {
        if (inst.op == Op::split || inst.op == Op::jump) inst.x += shift, inst.y += shift;
        prog_.push_back(inst);
      }
    };
    if (q == '+') {  // body; split(start, next)
      copy_body(0);
      const std::size_t s = emit(Op::split);
      prog_[s].x = start;
      prog_[s].y = s + 1;
    } else if (q == '*') {  // split(body, next); body; jump(split)
      const std::size_t s = emit(Op::split);
      copy_body(1);
      emit(Op::jump, s);
      prog_[s].x = s + 1;
      prog_[s].y = prog_.size();
    } else {  // '?': split(body, next); body
      const std::size_t s = emit(Op::split);
      copy_body(1);
      prog_[s].x = s + 1;
      prog_[s].y = prog_.size();
    }
  }

  void parse_atom(int depth) {
    const char c = key_[pos_++];
    switch (c) {
      case '(': {
        if (more() && key_[pos_] == '?') {
          if (pos_ + 1 < key_.size() && key_[pos_ + 1] == ':') {
            pos_ += 2;
          } else {
            fail("uses a (?...) construct other than (?:...), which peft does not support");
          }
        }
        parse_alternation(depth + 1);
        if (!more() || key_[pos_] != ')') fail("has an unclosed '('");
        ++pos_;
        return;
      }
      case ')':
        fail("has an unmatched ')'");
      case '*':
      case '+':
      case '?':
        fail("has nothing to repeat before '" + std::string(1, c) + "'");
      case '{':
        fail("uses a {m,n} repetition, which peft does not support");
      case '.':
        emit(Op::any);
        return;
      case '^':
        emit(Op::begin);
        return;
      case '$':
        emit(Op::end);
        return;
      case '[':
        parse_class();
        return;
      case '\\': {
        std::bitset<256> set;
        if (!more()) fail("ends in a lone '\\'");
        const char e = key_[pos_++];
        if (escape_class(e, set)) return emit_set(set, false);
        emit_char(static_cast<unsigned char>(escape_char(e)));
        return;
      }
      default:
        emit_char(static_cast<unsigned char>(c));
        return;
    }
  }

  // \d \w \s and their negations as a set; false for a single-character escape.
  static bool escape_class(char e, std::bitset<256>& set) {
    const auto fill = [&](bool (*in)(int), bool negate) {
      for (int b = 0; b < 256; ++b) set[std::size_t(b)] = in(b) != negate;
    };
    switch (e) {
      case 'd':
        fill([](int b) { return b >= '0' && b <= '9'; }, false);
        return true;
      case 'D':
        fill([](int b) { return b >= '0' && b <= '9'; }, true);
        return true;
      case 'w':
        fill(is_word, false);
        return true;
      case 'W':
        fill(is_word, true);
        return true;
      case 's':
        fill(is_space, false);
        return true;
      case 'S':
        fill(is_space, true);
        return true;
      default:
        return false;
    }
  }
  // Non-ASCII bytes count as word characters: Python's \w accepts letters of any script.
  static bool is_word(int b) {
    return (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || b == '_' ||
           b >= 0x80;
  }
  static bool is_space(int b) { return b == ' ' || (b >= '\t' && b <= '\r'); }

  char escape_char(char e) const {
    switch (e) {
      case 'n':
        return '\n';
      case 't':
        return '\t';
      case 'r':
        return '\r';
      case 'f':
        return '\f';
      case 'v':
        return '\v';
      default:
        break;
    }
    if (is_punct(e) || e == ' ') return e;
    if (e >= '0' && e <= '9')
      fail("uses a backreference (\\" + std::string(1, e) + "), which peft does not support");
    fail("uses the escape \\" + std::string(1, e) + ", which peft does not support");
  }

  void emit_set(const std::bitset<256>& set, bool negate) {
    sets_.push_back(negate ? ~set : set);
    prog_.push_back(Inst{Op::set, 0, sets_.size() - 1, 0});
  }

  void parse_class() {
    std::bitset<256> set;
    bool negate = false;
    if (more() && key_[pos_] == '^') negate = true, ++pos_;
    bool first = true;
    while (true) {
      if (!more()) fail("has an unclosed '['");
      char c = key_[pos_++];
      if (c == ']' && !first) break;
      first = false;
      int lo;
      if (c == '\\') {
        if (!more()) fail("has an unclosed '['");
        const char e = key_[pos_++];
        std::bitset<256> esc;
        if (escape_class(e, esc)) {
          set |= esc;
          continue;
        }
        lo = static_cast<unsigned char>(escape_char(e));
      } else {
        if (c == '[' && more() && (key_[pos_] == ':' || key_[pos_] == '=' || key_[pos_] == '.'))
          fail("uses a POSIX class, which peft does not support");
        lo = static_cast<unsigned char>(c);
      }
      int hi = lo;
      if (pos_ + 1 < key_.size() && key_[pos_] == '-' && key_[pos_ + 1] != ']') {
        ++pos_;
        char h = key_[pos_++];
        if (h == '\\') {
          if (!more()) fail("has an unclosed '['");
          h = escape_char(key_[pos_++]);
        }
        hi = static_cast<unsigned char>(h);
        if (hi < lo) fail("has a class range that runs backwards");
      }
      for (int b = lo; b <= hi; ++b) set[std::size_t(b)] = true;
    }
    emit_set(set, negate);
  }

  // Adds state pc (and everything reachable through jumps, splits and satisfied assertions) to
  // the list `next`; `mark` holds the step at which a state was last added.
  void add(std::vector<std::size_t>& list, std::vector<std::size_t>& mark, std::size_t step,
           std::size_t pc, std::size_t at, std::size_t size,
           std::vector<std::size_t>& stack) const {
    stack.clear();
    stack.push_back(pc);
    while (!stack.empty()) {
      const std::size_t p = stack.back();
      stack.pop_back();
      if (mark[p] == step) continue;
      mark[p] = step;
      const Inst& inst = prog_[p];
      switch (inst.op) {
        case Op::jump:
          stack.push_back(inst.x);
          break;
        case Op::split:
          stack.push_back(inst.y);
          stack.push_back(inst.x);
          break;
        case Op::begin:
          if (at == 0) stack.push_back(p + 1);
          break;
        case Op::end:
          if (at == size) stack.push_back(p + 1);
          break;
        default:
          list.push_back(p);
          break;
      }
    }
  }

  bool run(const std::string& s) const {
    std::vector<std::size_t> current, next, stack;
    std::vector<std::size_t> mark(prog_.size(), std::size_t(-1));
    current.reserve(prog_.size());
    next.reserve(prog_.size());
    add(current, mark, 0, 0, 0, s.size(), stack);
    for (std::size_t i = 0; i <= s.size(); ++i) {
      next.clear();
      for (std::size_t p : current) {
        const Inst& inst = prog_[p];
        if (inst.op == Op::match) {
          if (i == s.size()) return true;
          continue;
        }
        if (i == s.size()) continue;
        const unsigned char c = static_cast<unsigned char>(s[i]);
        const bool ok = inst.op == Op::ch    ? c == inst.c
                        : inst.op == Op::any ? c != '\n'
                                             : sets_[inst.x][c];
        if (ok) add(next, mark, i + 1, p + 1, i + 1, s.size(), stack);
      }
      if (next.empty()) return false;
      current.swap(next);
    }
    return false;
  }

  std::string key_;
  // literal fast path
  std::string literal_;
  std::vector<bool> wildcard_;
  bool anchored_ = false;
  // NFA
  std::vector<Inst> prog_;
  std::vector<std::bitset<256>> sets_;
  std::size_t pos_ = 0;
};

}  // namespace detail

/**
 * The keys of a rank_pattern or alpha_pattern compiled once, for looking up many modules: the
 * value of the first key (in file order) that selects the module, as PEFT does.
 */
template <typename Value>
class PatternMatcher {
 public:
  PatternMatcher() = default;
  explicit PatternMatcher(const std::vector<std::pair<std::string, Value>>& pattern) {
    keys_.reserve(pattern.size());
    for (const auto& [key, value] : pattern) keys_.emplace_back(detail::PatternKey(key), value);
  }

  Value first(const std::string& module, Value fallback) const {
    for (const auto& [key, value] : keys_) {
      if (key.key() == module || key.matches(module)) return value;
    }
    return fallback;
  }

  /// Steps matching `modules` names of `total_chars` characters in all would take at most.
  double cost(std::size_t modules, std::size_t total_chars) const {
    double c = 0;
    for (const auto& kv : keys_) {
      const detail::PatternKey& k = kv.first;
      c += k.is_literal() ? double(modules) * double(k.key().size() + 1)
                          : double(k.cost_per_char()) * double(total_chars + modules);
    }
    return c;
  }

  std::size_t size() const noexcept { return keys_.size(); }

 private:
  std::vector<std::pair<detail::PatternKey, Value>> keys_;
};

}  // namespace io
PEFT_NAMESPACE_END
