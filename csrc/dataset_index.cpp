// Dataset index builders: the hot loops of pretraining-dataset setup.
//
// engine/data/sample_index.py holds a pure-Python twin of each function; the tests require
// both to give identical arrays, so any change here must be mirrored there.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

// The blending loop compares floating-point errors; a fused multiply-add would round
// differently from Python's separate multiply and subtract and break the twin's equality.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Sample i covers tokens [i * seq_length, i * seq_length + seq_length] of the stream formed
// by the documents in doc_idx order: seq_length + 1 tokens, sharing its last token with the
// first token of sample i + 1. Row i of the result is (position in doc_idx, offset in that
// document) where sample i starts; row i + 1 is where it ends (inclusive).
static Int64Array build_sample_idx(const Int32Array& sizes_in, const Int64Array& doc_idx_in,
                                   int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be non-negative");
  const int32_t* sizes = sizes_in.data();
  const int64_t* doc_idx = doc_idx_in.data();
  const int64_t num_sizes = sizes_in.size();
  const int64_t num_docs = doc_idx_in.size();
  if (num_docs == 0 && num_samples > 0) throw std::out_of_range("doc_idx is empty");
  for (int64_t i = 0; i < num_docs; ++i) {
    if (doc_idx[i] < 0 || doc_idx[i] >= num_sizes)
      throw std::out_of_range("doc_idx entry " + std::to_string(i) + " is outside sizes");
  }

  Int64Array result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  bool ran_out = false;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;     // position in doc_idx
    int64_t doc_offset = 0;  // token offset inside that document
    out[0] = 0;
    out[1] = 0;
    for (int64_t sample = 1; sample <= num_samples && !ran_out; ++sample) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        const int64_t doc_left = static_cast<int64_t>(sizes[doc_idx[doc_pos]]) - doc_offset;
        remaining -= doc_left;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts on its last token.
          doc_offset += remaining + doc_left - 1;
          remaining = 0;
        } else if (doc_pos + 1 == num_docs) {
          ran_out = true;
          break;
        } else {
          ++doc_pos;
          doc_offset = 0;
        }
      }
      out[2 * sample] = doc_pos;
      out[2 * sample + 1] = doc_offset;
    }
  }
  if (ran_out) throw std::out_of_range("documents hold too few tokens for num_samples samples");
  return result;
}

// Greedy blending: sample i goes to the dataset whose share lags its weight the most, so
// after n samples every dataset d has received weights[d] * n samples rounded one way or
// the other (never more than one sample off). Returns (dataset of each sample, index of the
// sample within that dataset).
static py::tuple build_blending_indices(const DoubleArray& weights_in, int64_t size) {
  if (size < 0) throw std::invalid_argument("size must be non-negative");
  const double* weights = weights_in.data();
  const int64_t num_datasets = weights_in.size();
  if (num_datasets == 0) throw std::invalid_argument("weights must not be empty");

  Int64Array dataset_index(size);
  Int64Array dataset_sample_index(size);
  int64_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double n = static_cast<double>(i > 0 ? i : 1);
      int64_t best = 0;
      double best_error = weights[0] * n - static_cast<double>(taken[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weights[d] * n - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[i] = best;
      within[i] = taken[best];
      ++taken[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(trellis_cpp, m) {
  m.doc() = "Trellis C++ helpers: dataset sample-index and blending-index builders.";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_samples"),
        "Start (doc_idx position, offset) of each sample, shape [num_samples + 1, 2], int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy error-minimising assignment of samples to datasets: (dataset_index, dataset_sample_index).");
}
