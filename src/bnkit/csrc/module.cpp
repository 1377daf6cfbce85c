// The Python module bnkit._C: importing it loads this library, whose static initializers
// register the bnkit_cpu operators (ops.cpp, node.cpp) with torch's dispatcher. It has no
// Python functions of its own: everything is reached through torch.ops.bnkit_cpu.
#include <Python.h>

static struct PyModuleDef bnkit_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "bnkit's compiled CPU operators (torch.ops.bnkit_cpu)",
                                            -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
#ifdef BNKIT_AVX2  // the kernels were compiled for AVX2 (setup.py saw it on the build machine)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2")) {
    PyErr_SetString(PyExc_ImportError,
                    "bnkit._C was built for CPUs with AVX2 and this CPU lacks it; reinstall "
                    "bnkit here with BNKIT_BUILD_ARCH=generic");
    return nullptr;
  }
#endif
  return PyModule_Create(&bnkit_c_module);
}
