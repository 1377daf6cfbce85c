// The Python module bnkit._C: importing it loads this library, whose static initializers
// register the bnkit_cpu operators (ops.cpp, node.cpp) with torch's dispatcher. It has no
// Python functions of its own: everything is reached through torch.ops.bnkit_cpu.
#include <Python.h>

static struct PyModuleDef bnkit_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "bnkit's compiled CPU operators (torch.ops.bnkit_cpu)",
                                            -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&bnkit_c_module); }
