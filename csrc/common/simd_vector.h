// Fixed-size SIMD vectors for kernels written once for several instruction sets (affinity_tiles.h,
// Simd<generic> of spab_simd.h): GCC/clang vector extensions where the compiler has them,
// else (MSVC, -DDSCLORA_STANDARD_CPP) a plain C++17 array type with the same arithmetic.
// On both: element access v[i], V{} == 0, + - * / += and unary minus; comparisons and selects
// only through the helpers below.
//
// No include guard on purpose: isa_copies.h includes it in each instruction set's copy (namespace
// and target region), so that every function here is compiled for that instruction set (passing a
// vector to a function compiled without it would change the ABI). Needs cpu_features.h, <cstring>,
// <type_traits>.

#ifdef DSCLORA_GNU
template <typename T, int Bytes> struct VectorOf { typedef T type __attribute__((vector_size(Bytes))); };
template <typename T, int Bytes> using Vector = typename VectorOf<T, Bytes>::type;
#else
template <typename T, int Bytes>
struct Vector {
  static constexpr int size = Bytes / int(sizeof(T));
  T lane[size];

  T& operator[](int i) { return lane[i]; }
  T operator[](int i) const { return lane[i]; }

  template <class Op> static Vector zip(Vector a, const Vector& b, Op op) {
    for (int i = 0; i < size; ++i) a.lane[i] = op(a.lane[i], b.lane[i]);
    return a;
  }
  friend Vector operator+(const Vector& a, const Vector& b) { return zip(a, b, [](T x, T y) { return x + y; }); }
  friend Vector operator-(const Vector& a, const Vector& b) { return zip(a, b, [](T x, T y) { return x - y; }); }
  friend Vector operator*(const Vector& a, const Vector& b) { return zip(a, b, [](T x, T y) { return x * y; }); }
  friend Vector operator/(const Vector& a, const Vector& b) { return zip(a, b, [](T x, T y) { return x / y; }); }
  friend Vector operator-(const Vector& a) { return Vector{} - a; }
  Vector& operator+=(const Vector& b) { return *this = *this + b; }
};
#endif

template <typename V> using LaneOf = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;
template <typename V> constexpr int kLanesOf = int(sizeof(V) / sizeof(LaneOf<V>));

template <typename V> DSCLORA_INLINE V load_vector(const LaneOf<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V> DSCLORA_INLINE void store_vector(LaneOf<V>* p, V v) { std::memcpy(p, &v, sizeof v); }

// p[i] = Target(v[i]) for every lane: float <-> double (no vector wider than V is formed).
template <typename Target, typename V> DSCLORA_INLINE void store_converted(Target* p, V v) {
#ifdef DSCLORA_GNU
  const auto converted = __builtin_convertvector(v, Vector<Target, kLanesOf<V> * int(sizeof(Target))>);
  std::memcpy(p, &converted, sizeof converted);
#else
  for (int i = 0; i < kLanesOf<V>; ++i) p[i] = Target(v[i]);
#endif
}

// Every lane x. (With vector extensions x * 1 folds away, leaving a single broadcast instruction.)
template <typename V> DSCLORA_INLINE V splat(LaneOf<V> x) {
#ifdef DSCLORA_GNU
  return x * (V{} + LaneOf<V>(1));
#else
  V v;
  for (auto& lane : v.lane) lane = x;
  return v;
#endif
}

// Lane-wise key[i] < limit[i] ? a[i] : b[i].
template <typename V> DSCLORA_INLINE V select_less(V key, V limit, V a, V b) {
#ifdef DSCLORA_GNU
  return key < limit ? a : b;
#else
  for (int i = 0; i < kLanesOf<V>; ++i) b[i] = key[i] < limit[i] ? a[i] : b[i];
  return b;
#endif
}

// Lane-wise a[i] < b[i] ? a[i] : b[i], and a[i] > b[i] ? a[i] : b[i].
template <typename V> DSCLORA_INLINE V minimum(V a, V b) { return select_less(a, b, a, b); }
template <typename V> DSCLORA_INLINE V maximum(V a, V b) { return select_less(b, a, a, b); }

template <typename V> DSCLORA_INLINE V absolute(V d) {
#ifdef DSCLORA_GNU
  return d > 0 ? d : -d;
#else
  for (int i = 0; i < kLanesOf<V>; ++i) d[i] = d[i] > 0 ? d[i] : -d[i];
  return d;
#endif
}

// Lane-wise sign: 1, 0 or -1 (0 for zeros and NaN).
template <typename V> DSCLORA_INLINE V signum(V d) {
#ifdef DSCLORA_GNU
  const V one = splat<V>(1), zero = {};
  return (d > 0 ? one : zero) - (d < 0 ? one : zero);
#else
  for (int i = 0; i < kLanesOf<V>; ++i) d[i] = LaneOf<V>((d[i] > 0) - (d[i] < 0));
  return d;
#endif
}
