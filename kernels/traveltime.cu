/* First-arrival traveltimes for CUDA: the same relaxation as traveltime.cl,
 * one thread per interior cell, plain IEEE operations (__fadd_rn, __fmul_rn,
 * fminf: exact for the non-NaN values that occur), so results equal the
 * NumPy reference bit for bit. */

extern "C" __global__ void tt_step(const rk_control *ctl, const float *__restrict__ cur, float *__restrict__ nxt,
                                   const float *__restrict__ slow, unsigned int *last,
                                   const float h1, const float h2, const float h3, const int nx, const int nxy,
                                   const int cz0, const int cz1)
{
    RK_BEGIN(ctl);
    RK_INTERIOR_CELL(x, y, z, i, nx, nxy);
    const float *c = cur + i;
    const float m1 = fminf(fminf(c[-1], c[1]), fminf(fminf(c[-nx], c[nx]), fminf(c[-nxy], c[nxy])));
    float m2 = fminf(fminf(fminf(c[-nx - 1], c[-nx + 1]), fminf(c[nx - 1], c[nx + 1])),
                     fminf(fminf(c[-nxy - 1], c[-nxy + 1]), fminf(c[nxy - 1], c[nxy + 1])));
    m2 = fminf(m2, fminf(fminf(c[-nxy - nx], c[-nxy + nx]), fminf(c[nxy - nx], c[nxy + nx])));
    const float m3 = fminf(fminf(fminf(c[-nxy - nx - 1], c[-nxy - nx + 1]), fminf(c[-nxy + nx - 1], c[-nxy + nx + 1])),
                           fminf(fminf(c[nxy - nx - 1], c[nxy - nx + 1]), fminf(c[nxy + nx - 1], c[nxy + nx + 1])));
    const float sl = slow[z * nx + x];
    const float old = c[0];
    float t = fminf(old, __fadd_rn(m1, __fmul_rn(h1, sl)));
    t = fminf(t, __fadd_rn(m2, __fmul_rn(h2, sl)));
    t = fminf(t, __fadd_rn(m3, __fmul_rn(h3, sl)));
    nxt[i] = t;
    if (t < old && z >= cz0 && z < cz1) {  /* planes [cz0, cz1) count (a slab: its owned planes) */
        const rk_u64 step = ((const volatile rk_control *)ctl)->current_step;
        last[0] = (unsigned int)(step + 1ull);
    }
}
