// Argument checks that surface in Python as ValueError (pybind11 maps std::invalid_argument).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define EMBGEOM_CHECK(cond, msg)                                  \
  do {                                                            \
    if (!(cond)) {                                                \
      std::ostringstream embgeom_check_os_;                       \
      embgeom_check_os_ << msg;                                   \
      throw std::invalid_argument(embgeom_check_os_.str());       \
    }                                                             \
  } while (0)
