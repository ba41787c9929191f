// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// Compile-time gates (C++17, Eigen >= 3.4), the ABI namespace and the assertion/throw macros.
#pragma once
#define PEFT_CONFIG_HPP

#include <peft/version.hpp>

#include <Eigen/Core>

#include <cassert>
#include <cstdio>
#include <cstdlib>

#if defined(_MSVC_LANG)
#  define PEFT_CPLUSPLUS _MSVC_LANG
#else
#  define PEFT_CPLUSPLUS __cplusplus
#endif
#if PEFT_CPLUSPLUS < 201703L
#  error "peft requires C++17 or later (compile with -std=c++17 or link peft::peft in CMake)."
#endif

#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#  error "peft requires Eigen 3.4 or later."
#endif
/// Eigen 5 (3.4.90+) changed a few APIs (SVD options); code paths that differ test this macro.
#define PEFT_EIGEN5 EIGEN_VERSION_AT_LEAST(3, 4, 90)

// The ABI namespace follows the major version, so builds against different major versions can
// live in one process without ODR clashes (0.x minors share v0: pin one 0.x per program).
#define PEFT_ABI_NAMESPACE v0
#define PEFT_NAMESPACE_BEGIN \
  namespace peft {           \
  inline namespace PEFT_ABI_NAMESPACE {
#define PEFT_NAMESPACE_END \
  }                        \
  }

#if !defined(PEFT_NO_EXCEPTIONS) && !defined(__cpp_exceptions) && !defined(__EXCEPTIONS) && \
    !defined(_CPPUNWIND)
#  define PEFT_NO_EXCEPTIONS
#endif

/// Throws `ex`; without exceptions, prints its message and aborts. Overridable before inclusion.
#ifndef PEFT_THROW
#  ifdef PEFT_NO_EXCEPTIONS
#    define PEFT_THROW(ex)                               \
      do {                                               \
        std::fprintf(stderr, "peft: %s\n", (ex).what()); \
        std::abort();                                    \
      } while (0)
#  else
#    define PEFT_THROW(ex) throw ex
#  endif
#endif

/// 1 when the program links peft::compiled (CMake defines it): the headers then declare the
/// library's instantiations (float/double, row/column-major: every adapter, the SVDs) `extern`,
/// so a translation unit does not compile them again. Header-only use leaves it 0.
#ifndef PEFT_COMPILED
#  define PEFT_COMPILED 0
#endif

/// Internal invariant check (compiled out under NDEBUG). Redefine before inclusion to throw.
#ifndef PEFT_ASSERT
#  define PEFT_ASSERT(cond, msg) assert((cond) && msg)
#endif

PEFT_NAMESPACE_BEGIN
/// "MAJOR.MINOR.PATCH" of the headers in use.
inline const char* version_string() noexcept { return PEFT_VERSION_STRING; }
PEFT_NAMESPACE_END
